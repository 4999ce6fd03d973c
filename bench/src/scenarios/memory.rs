//! Memory held by the KMS and the server at scale.

use super::*;

/// Plants `n` key records straight into a prepared KMS's store (records that are never
/// unwrapped: the workload reads them through `/get_wrapped`).
pub(crate) async fn plant(store_dir: &Path, kek: &KekId, n: usize) -> Result<Vec<KeyId>> {
    let store = Arc::new(
        LmdbStore::open(store_dir, 4096, StoreMetrics::default())
            .map_err(|e| anyhow!("opening the key store to plant records: {e}"))?,
    );
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..256 {
        let (s, next, kek) = (Arc::clone(&store), Arc::clone(&next), kek.clone());
        set.spawn(async move {
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(ids);
                }
                let rec = planted_record(&kek, i)?;
                // One in a hundred is kept for the read workload.
                if i % 100 == 0 {
                    ids.push(rec.key_id.clone());
                }
                s.put_new(rec).await.map_err(|e| anyhow!("put_new: {e}"))?;
            }
        });
    }
    let mut ids = Vec::new();
    while let Some(r) = set.join_next().await {
        ids.extend(r.context("planting task")??);
    }
    Ok(ids)
}

/// The memory workload on a KMS holding `records` records (`sample` of them known): reads of
/// wrapped DEKs across the store, then creates and encrypts with more keys than the cache
/// holds. Returns the KMS's figures.
pub(crate) async fn kms_memory_workload(
    env: &Env,
    kms: &KmsRun,
    sample: Arc<Vec<KeyId>>,
    records: usize,
) -> Result<Memory> {
    let probe = Probe::start(&[proc_of("kms", &kms.proc)]);
    let lim = Limits {
        max_ops: if env.p.quick { 500 } else { 20_000 },
        budget: Duration::from_secs(60),
        warmup: 0,
    };
    let c = kms.client.clone();
    let s = Arc::clone(&sample);
    run_async("get_wrapped", 16, lim, 1, move |_, i| {
        let (c, s) = (c.clone(), Arc::clone(&s));
        async move {
            let k = s
                .get(i % s.len().max(1))
                .ok_or_else(|| anyhow!("no sample"))?;
            c.get_wrapped(k).await?;
            Ok(())
        }
    })
    .await?;
    // More live keys than the cache holds (1000 in the bench's KMS config).
    let keys = if env.p.quick { 300 } else { 3_000 };
    let c = kms.client.clone();
    let msg = Arc::new(random_bytes(MESSAGE_BYTES));
    run_async(
        "create+encrypt",
        16,
        Limits {
            max_ops: keys,
            budget: Duration::from_secs(120),
            warmup: 0,
        },
        1,
        move |_, _| {
            let (c, m) = (c.clone(), Arc::clone(&msg));
            async move {
                let k = new_key(&c, "mem").await?;
                c.encrypt(&k, &m, None).await?;
                Ok(())
            }
        },
    )
    .await?;
    let u = probe.finish();
    let p = pid(&kms.proc);
    Ok(Memory {
        process: "progressdb-kms".into(),
        records,
        peak_rss_kib: u
            .iter()
            .find(|u| u.name == "kms")
            .map_or(0, |u| u.peak_rss_kib),
        rss_anon_kib: status_kib(p, "RssAnon:"),
        rss_file_kib: status_kib(p, "RssFile:"),
    })
}

/// The server's figures after a read workload over `messages` stored messages.
pub(crate) fn server_memory(enc: &Prepared, messages: usize) -> Result<Memory> {
    let probe = Probe::start(&[proc_of("server", &enc.run.server.proc)]);
    run_threads(
        "pages",
        16,
        Limits {
            max_ops: 2_000,
            budget: Duration::from_secs(20),
            warmup: 0,
        },
        1,
        |w, _| {
            let t = enc
                .threads
                .get(w % enc.threads.len())
                .ok_or_else(|| anyhow!("no thread"))?;
            enc.run
                .call(
                    &enc.api,
                    "GET",
                    &format!("/v1/threads/{t}/messages?limit={PAGE}"),
                    None,
                    200,
                )
                .map(drop)
        },
    )?;
    let u = probe.finish();
    let p = pid(&enc.run.server.proc);
    Ok(Memory {
        process: "progressdb".into(),
        records: messages,
        peak_rss_kib: u
            .iter()
            .find(|u| u.name == "server")
            .map_or(0, |u| u.peak_rss_kib),
        rss_anon_kib: status_kib(p, "RssAnon:"),
        rss_file_kib: status_kib(p, "RssFile:"),
    })
}

/// Posts into the prepared threads until the server holds `total` messages.
pub(crate) fn fill_server(enc: &Prepared, total: usize) -> Result<()> {
    let have = enc.posted.load(Ordering::Relaxed);
    if have >= total {
        return Ok(());
    }
    eprintln!("  posting {} messages", total - have);
    run_threads(
        "fill",
        64,
        Limits {
            max_ops: total - have,
            budget: Duration::from_secs(3600),
            warmup: 0,
        },
        1,
        |w, i| {
            let t = enc
                .threads
                .get(w % enc.threads.len())
                .ok_or_else(|| anyhow!("no thread"))?;
            post(&enc.run, &enc.api, t, i)
        },
    )?;
    enc.posted.store(total, Ordering::Relaxed);
    Ok(())
}
