//! rustls configurations for the two ends of an HBONE connection.

use std::{sync::Arc, time::SystemTime};

use rustls::{
    ClientConfig, CommonState, ServerConfig, client::Resumption, server::WebPkiClientVerifier,
    version::TLS13,
};

use warren_pki::{
    identity::SpiffeId,
    tls::{
        TlsError, TrustBundle, WorkloadCertificate,
        provider::provider,
        spiffe_id_of, validity_of,
        verify::{CheckedClient, CheckedServer, InTrustDomain, OneOf},
    },
};

const ALPN_H2: &[u8] = b"h2";

/// Server side of HBONE for one destination workload: presents `cert` and
/// requires a client certificate chained to `trust`, from `cert`'s trust
/// domain.
pub fn server_config(
    cert: &WorkloadCertificate,
    trust: &TrustBundle,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = WebPkiClientVerifier::builder_with_provider(trust.store(), provider()).build()?;
    let verifier = CheckedClient::new(chain, InTrustDomain(cert.identity().trust_domain().clone()));
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(cert.chain().to_vec(), cert.key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // HBONE clients never resume, so tickets would be wasted bytes.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client side of HBONE, presenting the source workload's `cert`. The server
/// must chain to `trust` and be one of `expected`; there is no hostname
/// check, as SPIFFE certificates carry no DNS names.
pub fn client_config(
    cert: &WorkloadCertificate,
    trust: &TrustBundle,
    expected: &[SpiffeId],
) -> Result<Arc<ClientConfig>, TlsError> {
    if expected.is_empty() {
        return Err(TlsError::NoExpectedIdentity);
    }
    let provider = provider();
    let verifier = CheckedServer::new(
        trust.store(),
        provider.signature_verification_algorithms,
        OneOf(expected.to_vec()),
    );
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain().to_vec(), cert.key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Whether the connection's peer chose HTTP/2 by ALPN, as HBONE requires: a
/// client that offers no ALPN at all would otherwise be accepted (rustls
/// refuses only offers that do not include h2).
pub fn negotiated_h2(conn: &CommonState) -> bool {
    conn.alpn_protocol() == Some(ALPN_H2)
}

/// Whether the certificate chain a client presented (`chain`, leaf first)
/// still chains to one of `trust`'s roots, and is valid now: what an
/// established connection's peer must still satisfy after the trust bundle
/// changed.
pub fn client_still_trusted(
    chain: &[rustls::pki_types::CertificateDer<'static>],
    trust: &TrustBundle,
) -> bool {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return false;
    };
    let Ok(verifier) =
        WebPkiClientVerifier::builder_with_provider(trust.store(), provider()).build()
    else {
        return false;
    };
    verifier
        .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
        .is_ok()
}

/// The SPIFFE ID of the peer of an established connection.
pub fn peer_identity(conn: &CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    spiffe_id_of(leaf).ok()
}

/// When the peer's certificate expires: no connection should carry new
/// streams after that.
pub fn peer_not_after(conn: &CommonState) -> Option<SystemTime> {
    let leaf = conn.peer_certificates()?.first()?;
    validity_of(leaf).ok().map(|(_, not_after)| not_after)
}
