//! The KMS's paths: `/encrypt` cached and not, DEK creation, `/encrypt_batch`, each against
//! its limit (a canned server, a raw PKCS#11 loop, the key store's own rate, AES in-process).

use super::*;

/// `/encrypt` of 1 KiB through `client` at `conc`, round robin over nothing: one cached key.
pub(super) async fn encrypt_row(
    client: &KmsClient,
    key: &KeyId,
    conc: usize,
    lim: Limits,
    procs: &[(String, u32)],
) -> Result<Row> {
    let msg = Arc::new(random_bytes(MESSAGE_BYTES));
    let aad = Arc::new(aad_for("enc"));
    let (c, k) = (client.clone(), key.clone());
    watched(
        procs,
        run_async("KMS /encrypt", conc, lim, 1, move |_, _| {
            let (c, k, m, a) = (c.clone(), k.clone(), Arc::clone(&msg), Arc::clone(&aad));
            async move {
                c.encrypt(&k, &m, Some(&a)).await?;
                Ok(())
            }
        }),
    )
    .await
}

/// The canned body: the KMS's own answer to one `/encrypt` of 1 KiB.
pub(crate) async fn canned_encrypt_body(kms: &KmsRun) -> Result<(KeyId, Vec<u8>)> {
    let key = new_key(&kms.client, "enc").await?;
    let req = EncryptRequest {
        key_id: key.clone(),
        plaintext: SecretBytes::new(random_bytes(MESSAGE_BYTES)),
        aad: Some(Bytes64(aad_for("enc"))),
    };
    let (status, body) = kms
        .client
        .raw(http::Method::POST, "/encrypt", serde_json::to_vec(&req)?)
        .await?;
    if status != 200 {
        bail!("/encrypt answered {status}");
    }
    Ok((key, body.to_vec()))
}

/// KMS `/encrypt` 1 KiB, DEK cached, vs the canned server, same client, interleaved.
pub(crate) async fn kms_encrypt(
    env: &Env,
    kms: &KmsRun,
    key: &KeyId,
    canned: &CannedRun,
    canned_client: &KmsClient,
    conc: usize,
) -> Result<Outcome> {
    let lim = env.p.limits(400_000).per_round(env.p.rounds());
    let (mut sys, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..env.p.rounds() {
        sys.push(encrypt_row(&kms.client, key, conc, lim, &[proc_of("kms", &kms.proc)]).await?);
        bare.push(
            encrypt_row(
                canned_client,
                key,
                conc,
                lim,
                &[proc_of("canned", &canned.proc)],
            )
            .await?,
        );
    }
    let mut o = Outcome::new(
        &format!("kms_encrypt_1k_c{conc}"),
        format!("KMS /encrypt 1 KiB over UDS, DEK cached, c={conc}"),
        "req/s",
        Row::merge(sys.clone())?,
    );
    o.round_range = smallest_largest(&sys, &bare);
    o.limits.push((
        "bare hyper server on a UDS, canned /encrypt answer, same client".into(),
        Row::merge(bare)?,
    ));
    o.target = Some(0.8);
    Ok(o)
}

/// KMS `/decrypt` with the cache disabled (every call unwraps in the HSM) vs a raw unwrap loop
/// on as many threads as the KMS has HSM workers.
pub(crate) async fn kms_decrypt_uncached(env: &Env, kms: &KmsRun) -> Result<Outcome> {
    let conc = 64;
    let mut cts = Vec::new();
    for _ in 0..64 {
        let key = new_key(&kms.client, "dec").await?;
        let ct = kms
            .client
            .encrypt(&key, &random_bytes(MESSAGE_BYTES), Some(&aad_for("dec")))
            .await?
            .ciphertext
            .0;
        cts.push((key, ct));
    }
    let cts = Arc::new(cts);
    let set = raw_set(env, 64)?;
    let lim = env.p.limits(200_000).per_round(env.p.rounds());
    let (mut sys, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..env.p.rounds() {
        let (c, cts2) = (kms.client.clone(), Arc::clone(&cts));
        sys.push(
            watched(
                &[proc_of("kms (cache off)", &kms.proc)],
                run_async("KMS /decrypt uncached", conc, lim, 1, move |_, i| {
                    let (c, cts) = (c.clone(), Arc::clone(&cts2));
                    async move {
                        let (k, ct) = cts.get(i % cts.len()).ok_or_else(|| anyhow!("empty"))?;
                        c.decrypt(k, ct, Some(&aad_for("dec"))).await?;
                        Ok(())
                    }
                }),
            )
            .await?,
        );
        let s = Arc::clone(&set);
        raw.push(tokio::task::block_in_place(|| {
            raw_loop(env, "raw unwrap", KMS_HSM_SESSIONS, lim, |sess, h, i| {
                let w = s.get(i % s.len()).ok_or_else(|| anyhow!("empty"))?;
                hsm_raw::unwrap(sess, h, env.raw.kek(), w).map(drop)
            })
        })?);
    }
    let mut o = Outcome::new(
        "kms_decrypt_uncached_c64",
        format!("KMS /decrypt 1 KiB, cache disabled, c={conc}"),
        "req/s",
        Row::merge(sys.clone())?,
    );
    o.round_range = smallest_largest(&sys, &raw);
    o.limits.push((
        format!("raw PKCS#11 unwrap loop, {KMS_HSM_SESSIONS} threads (the KMS's HSM workers)"),
        Row::merge(raw)?,
    ));
    o.target = Some(0.7);
    Ok(o)
}

pub(super) fn planted_record(kek: &KekId, i: usize) -> Result<KeyRecord> {
    // The KMS's AesGcmV1 layout: format 1, KEK version 1 (big-endian u32), IV, DEK+tag.
    let mut blob = vec![1u8, 0, 0, 0, 1];
    blob.extend(random_bytes(12 + 32 + 16));
    Ok(KeyRecord {
        key_id: random_key_id(),
        kek_id: kek.clone(),
        kek_version: KekVersion::new(1)?,
        thread_id: ThreadId::parse(&format!("bench-plant-{i}"))?,
        created_at: 1_700_000_000,
        state: KeyState::Active {
            wrapped: WrappedDek::new(blob),
        },
    })
}

/// `create_dek_for_thread` at c=64 vs a raw generate+wrap loop and the key store's own
/// group-commit rate (an in-process LMDB store of the KMS's type, 64 writers).
pub(crate) async fn kms_create_dek(env: &Env, kms: &KmsRun, scratch: &Path) -> Result<Outcome> {
    let conc = 64;
    let run = hex_id();
    let seq = Arc::new(AtomicUsize::new(0));
    let lim = env.p.limits(100_000).per_round(env.p.rounds());
    let store = Arc::new(
        LmdbStore::open(scratch, 4096, StoreMetrics::default())
            .map_err(|e| anyhow!("opening a scratch key store: {e}"))?,
    );
    let kek = KekId::parse("bench-kek")?;
    let (mut sys, mut raw, mut st) = (Vec::new(), Vec::new(), Vec::new());
    let before = crate::kms_metrics(&kms.client).await?;
    for _ in 0..env.p.rounds() {
        let (c, r, s) = (kms.client.clone(), run.clone(), Arc::clone(&seq));
        sys.push(
            watched(
                &[proc_of("kms", &kms.proc)],
                run_async("KMS /create_dek_for_thread", conc, lim, 1, move |_, _| {
                    let (c, r, s) = (c.clone(), r.clone(), Arc::clone(&s));
                    async move {
                        let n = s.fetch_add(1, Ordering::Relaxed);
                        let t = ThreadId::parse(&format!("bench-c-{r}-{n}"))?;
                        c.create_dek_for_thread(&t).await?;
                        Ok(())
                    }
                }),
            )
            .await?,
        );
        raw.push(tokio::task::block_in_place(|| {
            raw_loop(
                env,
                "raw generate+wrap",
                KMS_HSM_SESSIONS,
                lim,
                |sess, h, _| {
                    hsm_raw::generate_wrap(sess, h, env.raw.kek(), random_key_id()).map(drop)
                },
            )
        })?);
        let (s2, k2, n2) = (Arc::clone(&store), kek.clone(), Arc::clone(&seq));
        st.push(
            watched(
                &[],
                run_async("key store put_new", conc, lim, 1, move |_, _| {
                    let (s, k, n) = (Arc::clone(&s2), k2.clone(), Arc::clone(&n2));
                    async move {
                        let rec = planted_record(&k, n.fetch_add(1, Ordering::Relaxed))?;
                        s.put_new(rec).await.map_err(|e| anyhow!("put_new: {e}"))
                    }
                }),
            )
            .await?,
        );
    }
    let after = crate::kms_metrics(&kms.client).await?;
    let mut o = Outcome::new(
        "kms_create_dek_c64",
        format!("KMS create_dek_for_thread, durable, c={conc}"),
        "req/s",
        Row::merge(sys)?,
    );
    o.limits.push((
        format!("raw PKCS#11 generate+wrap loop, {KMS_HSM_SESSIONS} threads"),
        Row::merge(raw)?,
    ));
    o.limits.push((
        "the key store's group commit alone (in-process, 64 writers, fsync)".into(),
        Row::merge(st)?,
    ));
    let d = |name: &str| {
        Some(crate::procs::metric(&after, name)? - crate::procs::metric(&before, name)?)
    };
    // A create is one store write of an audit group (its key records and audit entries,
    // one transaction); several groups can share a commit. Keys per commit is what counts.
    if let Some(c) = d("progressdb_kms_keystore_commits_total") {
        let created = o.system.calls + lim.warmup * env.p.rounds();
        if c > 0.0 {
            o.notes.push(format!(
                "{created} creates took {c:.0} durable commits: {:.1} keys per fsync",
                created as f64 / c
            ));
        }
    }
    o.target = Some(0.6);
    Ok(o)
}

/// `/encrypt_batch` of 100 × 1 KiB vs AES-256-GCM of the same items in-process on one core.
/// [`BATCH_ITEMS`] encrypt requests of 1 KiB under one new key, and their AAD.
pub(super) async fn batch_items(kms: &KmsRun) -> Result<(Arc<Vec<EncryptRequest>>, Vec<u8>)> {
    let key_id = new_key(&kms.client, "batch").await?;
    let aad = aad_for("batch");
    let items = (0..BATCH_ITEMS)
        .map(|_| EncryptRequest {
            key_id: key_id.clone(),
            plaintext: SecretBytes::new(random_bytes(MESSAGE_BYTES)),
            aad: Some(Bytes64(aad.clone())),
        })
        .collect();
    Ok((Arc::new(items), aad))
}

pub(crate) async fn kms_encrypt_batch(env: &Env, kms: &KmsRun) -> Result<Outcome> {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    use ring::rand::{SecureRandom as _, SystemRandom};
    let (items, aad) = batch_items(kms).await?;
    let lim = env.p.limits(20_000).per_round(env.p.rounds());
    let (mut sys, mut ring_rows) = (Vec::new(), Vec::new());
    let dek = zeroize::Zeroizing::new(random_bytes(32));
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &dek).map_err(|_| anyhow!("ring: bad key length"))?,
    );
    let rng = SystemRandom::new();
    let plain = random_bytes(MESSAGE_BYTES);
    for _ in 0..env.p.rounds() {
        let (c, it) = (kms.client.clone(), Arc::clone(&items));
        sys.push(
            watched(
                &[proc_of("kms", &kms.proc)],
                run_async("KMS /encrypt_batch", 1, lim, BATCH_ITEMS, move |_, _| {
                    let (c, it) = (c.clone(), Arc::clone(&it));
                    async move {
                        let res = c.encrypt_batch(it.as_ref()).await?;
                        if res.iter().any(|r| matches!(r, ItemResult::Error(_))) {
                            bail!("a batch item failed");
                        }
                        Ok(())
                    }
                }),
            )
            .await?,
        );
        ring_rows.push(tokio::task::block_in_place(|| {
            watched_sync(&[], || {
                run_threads("ring", 1, lim, BATCH_ITEMS, |_, _| {
                    for _ in 0..BATCH_ITEMS {
                        let mut nonce = [0u8; 12];
                        rng.fill(&mut nonce).map_err(|_| anyhow!("rng"))?;
                        let mut out = Vec::with_capacity(12 + MESSAGE_BYTES + 16);
                        out.extend_from_slice(&nonce);
                        out.extend_from_slice(&plain);
                        let tag = key
                            .seal_in_place_separate_tag(
                                Nonce::assume_unique_for_key(nonce),
                                Aad::from(&aad[..]),
                                out.get_mut(12..).ok_or_else(|| anyhow!("buffer"))?,
                            )
                            .map_err(|_| anyhow!("seal"))?;
                        out.extend_from_slice(tag.as_ref());
                        std::hint::black_box(out);
                    }
                    Ok(())
                })
            })
        })?);
    }
    let mut o = Outcome::new(
        "kms_encrypt_batch_100x1k",
        format!("KMS /encrypt_batch {BATCH_ITEMS} × 1 KiB over UDS, c=1"),
        "items/s",
        Row::merge(sys.clone())?,
    );
    o.round_range = smallest_largest(&sys, &ring_rows);
    o.limits.push((
        "in-process AES-256-GCM (ring) of the same items, one core".into(),
        Row::merge(ring_rows)?,
    ));
    Ok(o)
}
