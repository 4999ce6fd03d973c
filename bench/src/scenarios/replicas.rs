//! PostgreSQL against LMDB (docs/scaling.md): two KMS replicas on PostgreSQL against one KMS
//! on LMDB, and a server whose messages are in PostgreSQL against one on LMDB.

use super::*;

/// `create_dek_for_thread` at c=64 through a client spread over two KMS replicas that share
/// one SoftHSM token and a PostgreSQL key store, vs the same through the one KMS on its LMDB
/// store: the price of a shared store and of the replicas' turns at the audit log.
pub(crate) async fn replicas_create_dek(
    env: &Env,
    single: &KmsRun,
    replicas: &[KmsRun],
    spread: &KmsClient,
) -> Result<Outcome> {
    let conc = 64;
    let run = hex_id();
    let seq = Arc::new(AtomicUsize::new(0));
    let lim = env.p.limits(100_000).per_round(env.p.rounds());
    // PostgreSQL's backends are processes of their own, not counted here.
    let rep_procs: Vec<(String, u32)> = replicas
        .iter()
        .enumerate()
        .map(|(i, k)| (format!("kms replica {}", i + 1), pid(&k.proc)))
        .collect();
    let (mut sys, mut lim_rows) = (Vec::new(), Vec::new());
    let row = |c: KmsClient, what: &'static str| {
        let (r, s) = (run.clone(), Arc::clone(&seq));
        run_async(what, conc, lim, 1, move |_, _| {
            let (c, r, s) = (c.clone(), r.clone(), Arc::clone(&s));
            async move {
                let n = s.fetch_add(1, Ordering::Relaxed);
                let t = ThreadId::parse(&format!("bench-r-{r}-{n}"))?;
                c.create_dek_for_thread(&t).await?;
                Ok(())
            }
        })
    };
    for _ in 0..env.p.rounds() {
        sys.push(watched(&rep_procs, row(spread.clone(), "replicas create")).await?);
        lim_rows.push(
            watched(
                &[proc_of("kms (LMDB)", &single.proc)],
                row(single.client.clone(), "single create"),
            )
            .await?,
        );
    }
    let mut o = Outcome::new(
        "replicas_create_dek_c64",
        format!(
            "KMS create_dek_for_thread, durable, c={conc}, spread over 2 replicas on PostgreSQL"
        ),
        "req/s",
        Row::merge(sys.clone())?,
    );
    o.round_range = smallest_largest(&sys, &lim_rows);
    o.limits.push((
        "one KMS on its LMDB store, same client and load".into(),
        Row::merge(lim_rows)?,
    ));
    Ok(o)
}

/// Durable posts through a server whose `kms.endpoints` are the two replicas, vs the same
/// server build on the one LMDB KMS: what one server host does whichever KMS topology is
/// behind it.
pub(crate) fn replicas_server_post(
    env: &Env,
    on_replicas: &Prepared,
    on_single: &Prepared,
    replicas: &[KmsRun],
    single: &KmsRun,
) -> Result<Outcome> {
    let mut rep_procs = vec![proc_of("server", &on_replicas.run.server.proc)];
    rep_procs.extend(
        replicas
            .iter()
            .enumerate()
            .map(|(i, k)| (format!("kms replica {}", i + 1), pid(&k.proc))),
    );
    let single_procs = vec![
        proc_of("server", &on_single.run.server.proc),
        proc_of("kms (LMDB)", &single.proc),
    ];
    posts_against(
        env,
        "replicas_server_post_1k",
        "kms.endpoints = 2 replicas on PostgreSQL",
        (on_replicas, rep_procs),
        (on_single, single_procs),
        "the same server on one KMS with its LMDB store",
    )
}

/// Durable posts through a server whose messages are in PostgreSQL, vs the same server
/// build with its LMDB store, both on the one KMS: the price of the database.
pub(crate) fn postgres_server_post(
    env: &Env,
    on_postgres: &Prepared,
    on_lmdb: &Prepared,
    kms: &KmsRun,
) -> Result<Outcome> {
    // PostgreSQL's backends are processes of their own, not counted here.
    let procs = |p: &Prepared| {
        vec![
            proc_of("server", &p.run.server.proc),
            proc_of("kms (LMDB)", &kms.proc),
        ]
    };
    posts_against(
        env,
        "postgres_server_post_1k",
        "store.backend = \"postgres\" (one server, serializable group commits)",
        (on_postgres, procs(on_postgres)),
        (on_lmdb, procs(on_lmdb)),
        "the same server with its LMDB store",
    )
}

/// Posts of ~1 KiB at c=64 through `sys` and through `lim`, round after round interleaved:
/// the row `id` (`what` says how `sys` differs) against its same-run limit.
fn posts_against(
    env: &Env,
    id: &str,
    what: &str,
    sys: (&Prepared, Vec<(String, u32)>),
    lim: (&Prepared, Vec<(String, u32)>),
    lim_label: &str,
) -> Result<Outcome> {
    let conc = 64;
    let limits = env.p.limits(200_000).per_round(env.p.rounds());
    let (mut e, mut p) = (Vec::new(), Vec::new());
    for _ in 0..env.p.rounds() {
        e.push(watched_sync(&sys.1, || post_row(sys.0, conc, limits))?);
        p.push(watched_sync(&lim.1, || post_row(lim.0, conc, limits))?);
    }
    let mut o = Outcome::new(
        &format!("{id}_c{conc}"),
        format!("server POST message ~1 KiB, durable, {what}, c={conc}"),
        "msg/s",
        Row::merge(e.clone())?,
    );
    o.round_range = smallest_largest(&e, &p);
    o.limits.push((lim_label.into(), Row::merge(p)?));
    Ok(o)
}
