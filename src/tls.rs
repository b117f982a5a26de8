//! The process's one TLS crypto provider.

/// Installs ring as the rustls crypto provider of every HTTPS/WSS client (reqwest is built
/// without a default provider, whose default would be aws-lc-rs; see Cargo.toml). Call it before
/// building a TLS client; later calls do nothing.
pub fn install_crypto_provider() {
    // Fails harmlessly when a provider is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
