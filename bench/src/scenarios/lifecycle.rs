//! The lifecycle jobs: KEK rotation's bulk rewrap and a thread's DEK rotation.

use super::*;

/// Creates `n` DEKs at c=64.
async fn create_many(client: &KmsClient, n: usize, tag: &str) -> Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    let run = hex_id();
    for _ in 0..64 {
        let (c, next, run, tag) = (
            client.clone(),
            Arc::clone(&next),
            run.clone(),
            tag.to_owned(),
        );
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), anyhow::Error>(());
                }
                let t = ThreadId::parse(&format!("bench-{tag}-{run}-{i}"))?;
                c.create_dek_for_thread(&t).await?;
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

/// KEK rotation's rewrap phase over at least `n` DEKs vs a raw unwrap+wrap loop on as many
/// threads as the job runs rewraps at once.
pub(crate) async fn kek_rewrap(env: &Env, kms: &KmsRun, n: usize) -> Result<Outcome> {
    let existing = kms.admin.admin_status().await?.active_deks;
    if (existing as usize) < n {
        eprintln!("  creating {} DEKs for the rewrap", n - existing as usize);
        create_many(&kms.client, n - existing as usize, "rewrap").await?;
    }
    let probe = Probe::start(&[proc_of("kms", &kms.proc)]);
    let start = Instant::now();
    let job = kms.admin.rotate_kek().await?.job;
    let mut rewrap_done = None;
    let last = loop {
        let j = kms.admin.job(&job.id).await?;
        let state = serde_json::to_value(j.state)?;
        let state = state.as_str().unwrap_or("");
        if rewrap_done.is_none() && matches!(state, "verifying" | "succeeded") {
            rewrap_done = Some((start.elapsed(), j.progress.rewrapped));
        }
        match state {
            "succeeded" => break j,
            "failed" => bail!("the rotation failed: {j:?}"),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let total = start.elapsed();
    let usage = probe.finish();
    let (rewrap_time, rewrapped) = rewrap_done.ok_or_else(|| anyhow!("no rewrap phase seen"))?;
    let mut sys = Row::single(rewrapped as usize, rewrap_time);
    sys.usage = usage;
    let set = raw_set(env, 64)?;
    let lim = env.p.limits(400_000);
    let raw = tokio::task::block_in_place(|| {
        raw_loop(
            env,
            "raw unwrap+wrap",
            KMS_REWRAP_CONCURRENCY,
            lim,
            |sess, h, i| {
                let w = set.get(i % set.len()).ok_or_else(|| anyhow!("empty"))?;
                let dek = hsm_raw::unwrap(sess, h, env.raw.kek(), w)?;
                hsm_raw::wrap(sess, h, env.raw.kek(), w.key_id.clone(), &dek).map(drop)
            },
        )
    })?;
    let mut o = Outcome::new(
        &format!("kek_rewrap_{rewrapped}"),
        format!("KEK rotation: rewrap phase over {rewrapped} DEKs (job, rewrap concurrency {KMS_REWRAP_CONCURRENCY})"),
        "DEKs/s",
        sys,
    );
    o.limits.push((
        format!("raw PKCS#11 unwrap+wrap loop, {KMS_REWRAP_CONCURRENCY} threads"),
        raw,
    ));
    o.notes.push(format!(
        "the whole job (new KEK version, rewrap, then an unwrap of every DEK to verify) took {:.1} s: {:.0} DEKs/s; verified {}",
        total.as_secs_f64(),
        last.progress.verified as f64 / total.as_secs_f64().max(1e-9),
        last.progress.verified
    ));
    o.target = Some(0.6);
    Ok(o)
}

/// A thread's DEK rotation over `n` messages vs the KMS's decrypt+encrypt batch rate at the
/// job's batch size.
pub(crate) async fn thread_rotation(
    env: &Env,
    enc: &Prepared,
    kms: &KmsRun,
    n: usize,
) -> Result<Outcome> {
    let thread = tokio::task::block_in_place(|| -> Result<String> {
        let t = new_thread(&enc.run, &enc.api, "bench rotation")?;
        eprintln!("  posting {n} messages to one thread");
        run_threads(
            "fill",
            64,
            Limits {
                max_ops: n,
                budget: Duration::from_secs(3600),
                warmup: 0,
            },
            1,
            |_, i| post(&enc.run, &enc.api, &t, i),
        )?;
        enc.posted.fetch_add(n, Ordering::Relaxed);
        Ok(t)
    })?;
    let admin = enc.run.server.as_role(Role::Admin, "bench-ops");
    let procs = [
        proc_of("server", &enc.run.server.proc),
        proc_of("kms", &kms.proc),
    ];
    let (row, migrated) = tokio::task::block_in_place(|| -> Result<(Row, u64)> {
        let probe = Probe::start(&procs);
        let start = Instant::now();
        let r = enc.run.call(
            &admin,
            "POST",
            &format!("/admin/threads/{thread}/rotate-dek"),
            None,
            202,
        )?;
        let job = r["job_id"]
            .as_str()
            .ok_or_else(|| anyhow!("no job id: {r}"))?
            .to_owned();
        let migrated = loop {
            let j = enc
                .run
                .call(&admin, "GET", &format!("/admin/jobs/{job}"), None, 200)?;
            match j["state"].as_str() {
                Some("succeeded") => break j["progress"]["migrated"].as_u64().unwrap_or(0),
                Some("failed") => bail!("the rotation failed: {j}"),
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let mut row = Row::single(n, start.elapsed());
        row.usage = probe.finish();
        Ok((row, migrated))
    })?;
    if migrated as usize != n {
        bail!("the rotation migrated {migrated} messages, expected {n}");
    }
    // The limit: one decrypt_batch and one encrypt_batch of the job's batch size, in turn.
    let key = new_key(&kms.client, "rot").await?;
    let aad = aad_for("rot");
    let mut dec = Vec::new();
    for _ in 0..SERVER_ROTATION_BATCH {
        let ct = kms
            .client
            .encrypt(&key, &random_bytes(MESSAGE_BYTES), Some(&aad))
            .await?
            .ciphertext;
        dec.push(DecryptRequest {
            key_id: key.clone(),
            ciphertext: ct,
            aad: Some(Bytes64(aad.clone())),
        });
    }
    let encs: Vec<EncryptRequest> = (0..SERVER_ROTATION_BATCH)
        .map(|_| EncryptRequest {
            key_id: key.clone(),
            plaintext: SecretBytes::new(random_bytes(MESSAGE_BYTES)),
            aad: Some(Bytes64(aad.clone())),
        })
        .collect();
    let (dec, encs) = (Arc::new(dec), Arc::new(encs));
    let c = kms.client.clone();
    let lim = env.p.limits(50_000);
    let limit = watched(
        &[proc_of("kms", &kms.proc)],
        run_async(
            "KMS decrypt_batch + encrypt_batch",
            1,
            lim,
            SERVER_ROTATION_BATCH,
            move |_, _| {
                let (c, d, e) = (c.clone(), Arc::clone(&dec), Arc::clone(&encs));
                async move {
                    let a = c.decrypt_batch(&d).await?;
                    let b = c.encrypt_batch(&e).await?;
                    let failed_dec = a.iter().any(|r| matches!(r, ItemResult::Error(_)));
                    let failed_enc = b.iter().any(|r| matches!(r, ItemResult::Error(_)));
                    if failed_dec || failed_enc {
                        bail!("a batch item failed");
                    }
                    Ok(())
                }
            },
        ),
    )
    .await?;
    let mut o = Outcome::new(
        &format!("thread_dek_rotation_{n}"),
        format!("thread DEK rotation over {n} messages of ~1 KiB (job, verify included)"),
        "msg/s",
        row,
    );
    o.limits.push((
        format!("KMS decrypt_batch + encrypt_batch of {SERVER_ROTATION_BATCH} × 1 KiB, one after the other"),
        limit,
    ));
    o.target = Some(0.5);
    Ok(o)
}
