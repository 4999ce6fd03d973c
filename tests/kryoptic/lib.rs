//! Empty: this package exists only to build the `kryoptic` dependency's PKCS#11 module
//! (see Cargo.toml).
