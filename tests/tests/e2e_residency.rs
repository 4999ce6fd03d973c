//! DEK residency: a KMS with `hsm.dek_residency = "hsm"` serves the same API and ciphertext
//! format as one in `memory` mode, and no DEK it used is in its memory afterwards, while the
//! same scan finds them in a `memory` KMS.
//!
//! The test recovers each DEK on its own side, through its own PKCS#11 session with the PIN:
//! it asks the KMS for the wrapped DEK (`/get_wrapped`) and unwraps it with the KEK (SoftHSM
//! applies no unwrap template, so a PIN holder may unwrap into a readable object; `C_Decrypt`
//! for the `memory` KEK). Then it reads every writable mapping of the running KMS through
//! `/proc/PID/mem` and searches it for each DEK.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use base64::Engine as _;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::{AuthPin, Ulong};
use progressdb_e2e::{Kms, KmsBuilder, Residency, Token};
use serde_json::json;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A KMS on `hsm` whose KEK (label `kek`) is made by `init-kek` in residency `mode`.
fn kms_in(root: &Path, hsm: &Token, kek: &str, mode: Residency) -> Kms {
    fs::create_dir_all(root).unwrap();
    KmsBuilder::new(root)
        .token(hsm)
        .kek_label(kek)
        .residency(mode)
        .start()
}

/// Creates `n` keys and runs encrypts, decrypts and batches under each; returns the key ids.
fn workload(kms: &Kms, tag: &str, n: usize) -> Vec<String> {
    let mut keys = Vec::new();
    for i in 0..n {
        let (s, k) = kms.call(
            "POST",
            "/create_dek_for_thread",
            Some(json!({ "thread_id": format!("{tag}-{i}") })),
        );
        assert_eq!(s, 200, "{k}");
        keys.push(k["key_id"].as_str().unwrap().to_owned());
    }
    for key in &keys {
        let pt = B64.encode(format!("message under {key}"));
        let (s, e) = kms.call(
            "POST",
            "/encrypt",
            Some(json!({ "key_id": key, "plaintext": pt, "aad": B64.encode("aad") })),
        );
        assert_eq!(s, 200, "{e}");
        let ct = e["ciphertext"].as_str().unwrap().to_owned();
        let (s, d) = kms.call(
            "POST",
            "/decrypt",
            Some(json!({ "key_id": key, "ciphertext": ct, "aad": B64.encode("aad") })),
        );
        assert_eq!(s, 200, "{d}");
        assert_eq!(d["plaintext"], pt);
        // Wrong AAD: the one opaque failure.
        let (s, d) = kms.call(
            "POST",
            "/decrypt",
            Some(json!({ "key_id": key, "ciphertext": ct, "aad": B64.encode("other") })),
        );
        assert_eq!(s, 422, "{d}");
        assert_eq!(d["error"]["code"], "decryption_failed");
        // A batch of 40 items under this key and the next: spread over the sessions.
        let items: Vec<_> = (0..40)
            .map(|j| {
                json!({ "key_id": keys[(j % 2 + keys.iter().position(|k| k == key).unwrap()) % keys.len()],
                        "plaintext": B64.encode(format!("item {j}")) })
            })
            .collect();
        let (s, b) = kms.call("POST", "/encrypt_batch", Some(json!({ "items": items })));
        assert_eq!(s, 200, "{b}");
        let back: Vec<_> = b["results"]
            .as_array()
            .unwrap()
            .iter()
            .zip(&items)
            .map(|(r, i)| json!({ "key_id": i["key_id"], "ciphertext": r["ok"]["ciphertext"] }))
            .collect();
        let (s, d) = kms.call("POST", "/decrypt_batch", Some(json!({ "items": back })));
        assert_eq!(s, 200, "{d}");
        for (j, r) in d["results"].as_array().unwrap().iter().enumerate() {
            assert_eq!(r["ok"]["plaintext"], B64.encode(format!("item {j}")), "{r}");
        }
    }
    keys
}

fn session(hsm: &Token) -> Session {
    let p = Pkcs11::new(&hsm.module).unwrap();
    p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = p
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| {
            p.get_token_info(*s)
                .map(|t| t.label().trim_end() == hsm.label)
                .unwrap_or(false)
        })
        .unwrap();
    let s = p.open_ro_session(slot).unwrap();
    s.login(UserType::User, Some(&AuthPin::new(hsm.pin.clone().into())))
        .unwrap();
    // The context must outlive the session; the test process ends soon after.
    std::mem::forget(p);
    s
}

fn kek(s: &Session, label: &str) -> ObjectHandle {
    s.find_objects(&[
        Attribute::Token(true),
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(vec![0, 0, 0, 1]),
    ])
    .unwrap()[0]
}

/// The DEK of `key_id`, recovered by the test through its own session.
fn recover(s: &Session, kms: &Kms, kek_label: &str, key_id: &str) -> Vec<u8> {
    let (st, w) = kms.call("GET", &format!("/get_wrapped?key_id={key_id}"), None);
    assert_eq!(st, 200, "{w}");
    let blob = B64.decode(w["wrapped"].as_str().unwrap()).unwrap();
    let k = kek(s, kek_label);
    match blob[0] {
        // AesGcmV1 under an encrypt-class KEK.
        0x01 => {
            let mut iv: [u8; 12] = blob[5..17].try_into().unwrap();
            let mut aad = b"progressdb-kms:dek:v1\0".to_vec();
            aad.extend_from_slice(key_id.as_bytes());
            aad.push(0);
            aad.extend_from_slice(kek_label.as_bytes());
            aad.push(0);
            aad.extend_from_slice(&1u32.to_be_bytes());
            let params = GcmParams::new(&mut iv, &aad, Ulong::new(128)).unwrap();
            s.decrypt(&Mechanism::AesGcm(params), k, &blob[17..])
                .unwrap()
        }
        // AesKwV3 under a wrap-class KEK: unwrapped into a readable object of ours.
        0x03 => {
            assert_eq!(blob.len(), 77);
            let h = s
                .unwrap_key(
                    &Mechanism::AesKeyWrap,
                    k,
                    &blob[5..45],
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::Token(false),
                        Attribute::Sensitive(false),
                        Attribute::Extractable(true),
                    ],
                )
                .unwrap();
            let v = s.get_attributes(h, &[AttributeType::Value]).unwrap();
            s.destroy_object(h).unwrap();
            match &v[0] {
                Attribute::Value(v) => v.clone(),
                other => panic!("{other:?}"),
            }
        }
        t => panic!("unknown wrap format {t}"),
    }
}

/// How many of `deks` appear anywhere in the writable memory of process `pid`.
fn found_in_memory(pid: i32, deks: &[Vec<u8>]) -> usize {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut found = vec![false; deks.len()];
    let finders: Vec<_> = deks.iter().map(memchr::memmem::Finder::new).collect();
    let mut scanned = 0usize;
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut buf = vec![0u8; (b - a) as usize];
        // A writable region the scan cannot read could hold a DEK: that fails the scan rather
        // than passing it.
        mem.seek(SeekFrom::Start(a)).unwrap();
        if let Err(e) = mem.read_exact(&mut buf) {
            panic!("cannot read the writable region {line} of process {pid}: {e}");
        }
        scanned += buf.len();
        for (i, f) in finders.iter().enumerate() {
            if f.find(&buf).is_some() {
                found[i] = true;
            }
        }
    }
    assert!(scanned > 1 << 20, "the scan read only {scanned} bytes");
    found.iter().filter(|f| **f).count()
}

#[test]
fn hsm_residency_keeps_every_dek_out_of_the_kms_memory_and_memory_mode_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let hsm = Token::new(tmp.path());
    // The test's own PKCS#11 context reads the same token.
    std::env::set_var(hsm.conf_var, &hsm.conf);

    let resident = kms_in(
        &tmp.path().join("hsm"),
        &hsm,
        "resident-kek",
        Residency::Hsm,
    );
    let memory = kms_in(
        &tmp.path().join("memory"),
        &hsm,
        "memory-kek",
        Residency::Memory,
    );
    let rkeys = workload(&resident, "r", 6);
    let mkeys = workload(&memory, "m", 6);

    // Both modes write the same ciphertext format: what one encrypts under a key, the same
    // AES-GCM opens with the DEK the test recovered.
    let s = session(&hsm);
    let rdeks: Vec<Vec<u8>> = rkeys
        .iter()
        .map(|k| recover(&s, &resident, &resident.kek_label, k))
        .collect();
    let mdeks: Vec<Vec<u8>> = mkeys
        .iter()
        .map(|k| recover(&s, &memory, &memory.kek_label, k))
        .collect();
    for (key, dek) in rkeys.iter().zip(&rdeks) {
        assert_eq!(dek.len(), 32);
        let (st, e) = resident.call(
            "POST",
            "/encrypt",
            Some(json!({ "key_id": key, "plaintext": B64.encode("interop") })),
        );
        assert_eq!(st, 200, "{e}");
        let ct = B64.decode(e["ciphertext"].as_str().unwrap()).unwrap();
        let k = ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, dek).unwrap(),
        );
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(&ct[..12]).unwrap();
        let mut body = ct[12..].to_vec();
        let pt = k
            .open_in_place(nonce, ring::aead::Aad::empty(), &mut body)
            .unwrap();
        assert_eq!(pt, b"interop");
    }

    // One batch over more keys than every HSM worker queue holds (4 sessions × 64): each key
    // is an HSM job, and none of them may be refused as overloaded.
    let many: Vec<String> = (0..300)
        .map(|i| {
            let (s, k) = resident.call(
                "POST",
                "/create_dek_for_thread",
                Some(json!({ "thread_id": format!("many-{i}") })),
            );
            assert_eq!(s, 200, "{k}");
            k["key_id"].as_str().unwrap().to_owned()
        })
        .collect();
    let items: Vec<_> = many
        .iter()
        .map(|k| json!({ "key_id": k, "plaintext": B64.encode(k) }))
        .collect();
    let (s, b) = resident.call("POST", "/encrypt_batch", Some(json!({ "items": items })));
    assert_eq!(s, 200, "{b}");
    let results = b["results"].as_array().unwrap();
    assert_eq!(results.len(), 300);
    let refused: Vec<_> = results
        .iter()
        .filter(|r| !r["ok"]["ciphertext"].is_string())
        .collect();
    assert!(
        refused.is_empty(),
        "{} of 300 items refused: {:?}",
        refused.len(),
        refused.first()
    );

    let in_memory_mode = found_in_memory(memory.proc.pid(), &mdeks);
    let in_hsm_mode = found_in_memory(resident.proc.pid(), &rdeks);
    eprintln!(
        "DEKs found in the KMS's memory: memory mode {in_memory_mode}/{}, hsm mode {in_hsm_mode}/{}",
        mdeks.len(),
        rdeks.len()
    );
    assert_eq!(
        in_memory_mode,
        mdeks.len(),
        "the scan must find every DEK a memory-mode KMS caches (else it proves nothing)"
    );
    assert_eq!(in_hsm_mode, 0, "a DEK is in the memory of an hsm-mode KMS");

    // What the HSM holds for the resident KMS: its metrics count session objects made.
    let m = resident.metrics();
    assert!(
        progressdb_e2e::metric(&m, "progressdb_kms_hsm_resident_loads_total").unwrap_or(0.0) >= 6.0,
        "{m}"
    );
}

/// Sets `hsm.dek_residency` in `kms`'s config and restarts it.
fn switch(kms: &mut Kms, mode: &str) {
    set_residency(&kms.config, mode);
    kms.restart();
}

fn set_residency(config: &Path, mode: &str) {
    let text = fs::read_to_string(config).unwrap();
    let text: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("dek_residency") {
                format!("dek_residency = \"{mode}\"")
            } else {
                l.to_owned()
            }
        })
        .collect();
    assert!(text.iter().any(|l| l.starts_with("dek_residency")));
    fs::write(config, text.join("\n") + "\n").unwrap();
}

fn encrypt(kms: &Kms, key: &str, text: &str) -> String {
    let (s, e) = kms.call(
        "POST",
        "/encrypt",
        Some(json!({ "key_id": key, "plaintext": B64.encode(text), "aad": B64.encode(key) })),
    );
    assert_eq!(s, 200, "{e}");
    e["ciphertext"].as_str().unwrap().to_owned()
}

fn assert_decrypts(kms: &Kms, sealed: &[(String, String, String)]) {
    for (key, text, ct) in sealed {
        let (s, d) = kms.call(
            "POST",
            "/decrypt",
            Some(json!({ "key_id": key, "ciphertext": ct, "aad": B64.encode(key) })),
        );
        assert_eq!(s, 200, "{d}");
        assert_eq!(d["plaintext"], B64.encode(text));
    }
}

fn wrap_format(kms: &Kms, key: &str) -> u8 {
    let (s, w) = kms.call("GET", &format!("/get_wrapped?key_id={key}"), None);
    assert_eq!(s, 200, "{w}");
    B64.decode(w["wrapped"].as_str().unwrap()).unwrap()[0]
}

fn counter(kms: &Kms, name: &str) -> f64 {
    progressdb_e2e::metric(&kms.metrics(), name).unwrap_or(0.0)
}

/// memory → hsm → (rotation) → memory, without re-encrypting a message: every message
/// written in one mode is read in the others; the rotation in hsm mode moves every DEK to a
/// wrap-class KEK, after which no DEK passes through the process again.
#[test]
fn a_deployment_switches_residency_both_ways_without_re_encrypting() {
    let tmp = tempfile::tempdir().unwrap();
    let hsm = Token::new(tmp.path());
    let mut kms = kms_in(
        &tmp.path().join("kms"),
        &hsm,
        "switch-kek",
        Residency::Memory,
    );
    let mut sealed = Vec::new();
    let mut keys = Vec::new();
    let mut create = |kms: &Kms, tag: &str, sealed: &mut Vec<(String, String, String)>| {
        let (s, k) = kms.call(
            "POST",
            "/create_dek_for_thread",
            Some(json!({ "thread_id": tag })),
        );
        assert_eq!(s, 200, "{k}");
        let key = k["key_id"].as_str().unwrap().to_owned();
        let text = format!("written under {tag}");
        sealed.push((key.clone(), text.clone(), encrypt(kms, &key, &text)));
        keys.push(key);
    };
    for i in 0..4 {
        create(&kms, &format!("memory-{i}"), &mut sealed);
    }

    // To hsm mode: the encrypt-class KEK's DEKs are imported once each.
    switch(&mut kms, "hsm");
    assert_decrypts(&kms, &sealed);
    assert!(counter(&kms, "progressdb_kms_hsm_dek_imports_total") >= 4.0);
    create(&kms, "hsm-before-rotation", &mut sealed);
    let st = kms.cli_json(&["status", "--json"]);
    assert_eq!(st["hsm"]["token"]["dek_residency"], "hsm", "{st}");

    // The rotation makes a wrap-class KEK version and moves every DEK to it.
    let job = kms.cli_json(&["rotate-kek", "--json"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    let st = kms.cli_json(&["status", "--json"]);
    assert_eq!(st["current_version"], 2, "{st}");
    let v1 = st["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == 1)
        .unwrap()
        .clone();
    assert_eq!(v1["deks"], 0, "{st}");
    for key in &keys {
        assert_eq!(
            wrap_format(&kms, key),
            0x03,
            "{key} was not moved to AesKwV3"
        );
    }
    // The old version destroyed while the KMS still caches blobs under it: it reads the
    // moved records again.
    let out = kms.cli(&["kek", "destroy", "--version", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_decrypts(&kms, &sealed);
    kms.restart();
    assert_decrypts(&kms, &sealed);
    let key = {
        let (s, k) = kms.call(
            "POST",
            "/create_dek_for_thread",
            Some(json!({ "thread_id": "hsm-after-rotation" })),
        );
        assert_eq!(s, 200, "{k}");
        k["key_id"].as_str().unwrap().to_owned()
    };
    sealed.push((key.clone(), "after".into(), encrypt(&kms, &key, "after")));
    assert_eq!(wrap_format(&kms, &key), 0x03);
    assert_eq!(
        counter(&kms, "progressdb_kms_hsm_dek_imports_total"),
        0.0,
        "after the rotation no DEK passes through the KMS"
    );
    assert!(counter(&kms, "progressdb_kms_hsm_resident_loads_total") >= 6.0);

    // Back to memory mode: AesKwV3 DEKs are unwrapped into memory; new ones are AesKwV3
    // too (the current KEK is wrap-class).
    switch(&mut kms, "memory");
    assert_decrypts(&kms, &sealed);
    let (s, k) = kms.call(
        "POST",
        "/create_dek_for_thread",
        Some(json!({ "thread_id": "memory-again" })),
    );
    assert_eq!(s, 200, "{k}");
    let key = k["key_id"].as_str().unwrap().to_owned();
    assert_eq!(wrap_format(&kms, &key), 0x03);
    sealed.push((key.clone(), "again".into(), encrypt(&kms, &key, "again")));
    switch(&mut kms, "hsm");
    assert_decrypts(&kms, &sealed);
}
