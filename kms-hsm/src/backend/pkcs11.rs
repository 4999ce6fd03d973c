//! PKCS#11 backend (to be written).
