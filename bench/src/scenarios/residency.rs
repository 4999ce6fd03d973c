//! DEKs resident in the HSM (`hsm.dek_residency`): encrypt and batches through the token.

use super::*;

/// `/encrypt` 1 KiB at `conc` on a KMS with `hsm.dek_residency = "hsm"` (every message
/// encrypted by the HSM) vs the same on a memory-mode KMS, same client, interleaved.
pub(crate) async fn kms_hsm_encrypt(
    env: &Env,
    memory: &KmsRun,
    resident: &KmsRun,
    conc: usize,
) -> Result<Outcome> {
    let (mkey, rkey) = (
        new_key(&memory.client, "enc").await?,
        new_key(&resident.client, "enc").await?,
    );
    let lim = env.p.limits(200_000).per_round(env.p.rounds());
    let (mut sys, mut mem) = (Vec::new(), Vec::new());
    for _ in 0..env.p.rounds() {
        sys.push(
            encrypt_row(
                &resident.client,
                &rkey,
                conc,
                lim,
                &[proc_of("kms", &resident.proc)],
            )
            .await?,
        );
        mem.push(
            encrypt_row(
                &memory.client,
                &mkey,
                conc,
                lim,
                &[proc_of("kms", &memory.proc)],
            )
            .await?,
        );
    }
    let mut o = Outcome::new(
        &format!("kms_hsm_encrypt_1k_c{conc}"),
        format!(
            "KMS /encrypt 1 KiB over UDS, hsm.dek_residency = hsm (AES-GCM in the HSM), c={conc}"
        ),
        "req/s",
        Row::merge(sys.clone())?,
    );
    o.round_range = smallest_largest(&sys, &mem);
    o.limits.push((
        "the same KMS build in memory residency (DEK cached in the KMS), same client".into(),
        Row::merge(mem)?,
    ));
    Ok(o)
}

/// `/encrypt_batch` of [`BATCH_ITEMS`] × 1 KiB in hsm residency (spread over the HSM
/// sessions) vs memory residency, c=4.
pub(crate) async fn kms_hsm_encrypt_batch(
    env: &Env,
    memory: &KmsRun,
    resident: &KmsRun,
) -> Result<Outcome> {
    async fn row(env: &Env, kms: &KmsRun) -> Result<Row> {
        let (items, _) = batch_items(kms).await?;
        let lim = env.p.limits(10_000).per_round(env.p.rounds());
        let c = kms.client.clone();
        watched(
            &[proc_of("kms", &kms.proc)],
            run_async("KMS /encrypt_batch", 4, lim, BATCH_ITEMS, move |_, _| {
                let (c, it) = (c.clone(), Arc::clone(&items));
                async move {
                    let res = c.encrypt_batch(it.as_ref()).await?;
                    if res.iter().any(|r| matches!(r, ItemResult::Error(_))) {
                        bail!("a batch item failed");
                    }
                    Ok(())
                }
            }),
        )
        .await
    }
    let (mut sys, mut mem) = (Vec::new(), Vec::new());
    for _ in 0..env.p.rounds() {
        sys.push(row(env, resident).await?);
        mem.push(row(env, memory).await?);
    }
    let mut o = Outcome::new(
        "kms_hsm_encrypt_batch_100x1k",
        format!("KMS /encrypt_batch {BATCH_ITEMS} × 1 KiB over UDS, hsm.dek_residency = hsm, c=4"),
        "items/s",
        Row::merge(sys.clone())?,
    );
    o.round_range = smallest_largest(&sys, &mem);
    o.limits.push((
        "the same batches in memory residency".into(),
        Row::merge(mem)?,
    ));
    Ok(o)
}
