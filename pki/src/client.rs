//! A client of Istio's certificate service (warren's CA or istiod),
//! authenticated as its node (a node credential, or on Kubernetes the agent
//! Pod's service-account token): what the agent's workload certificates come
//! through, and what the CA's tests talk to it with.

use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::{
    metadata::{Ascii, MetadataValue},
    transport::{Channel, Endpoint},
};

use crate::{
    api::{
        IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
    },
    tls::TrustBundle,
    transport::{self, NodeCredential, TransportError},
};

/// Connecting (TCP and TLS) and each request take at most this long, so that
/// a stalled CA shows up as an error the caller can retry.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("CA address {0:?} is not usable")]
    Address(String),
    #[error("cannot connect to the CA: {0}")]
    Connect(#[source] tonic::transport::Error),
    #[error("the CA request failed: {}: {}", .0.code(), .0.message())]
    Request(#[source] tonic::Status),
    #[error("the CA's answer is unusable: {0}")]
    BadAnswer(String),
    #[error("service-account token {}: {reason}", path.display())]
    Token { path: PathBuf, reason: String },
}

impl ClientError {
    /// The gRPC status of a failed request: the CA's answer, or tonic's
    /// (e.g. `Unavailable`) when the connection failed.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Self::Request(status) => Some(status),
            _ => None,
        }
    }
}

/// Makes the TLS configuration for each new connection to the CA, so that a
/// renewed node credential or a changed trust bundle needs no restart.
pub type TlsSource = Arc<dyn Fn() -> Result<Arc<ClientConfig>, TransportError> + Send + Sync>;

/// A connection to the CA (reconnected as needed), cheap to clone.
#[derive(Clone, Debug)]
pub struct CaClient {
    channel: Channel,
    /// A file holding the token each request carries, if the CA
    /// authenticates callers by token.
    token: Option<PathBuf>,
}

impl CaClient {
    /// Connects to the CA at `addr` (`host:port`) as the node of `credential`;
    /// the CA must chain to `roots` and present the CA service's identity.
    ///
    /// With TLS 1.3 the server checks the client's certificate after the
    /// client considers the handshake done, so a refused credential may show
    /// only at the first request.
    pub async fn connect(
        addr: &str,
        credential: &NodeCredential,
        roots: &TrustBundle,
    ) -> Result<Self, ClientError> {
        let tls = transport::client_config(credential, roots)?;
        let channel = endpoint(addr)?
            .connect_with_connector(connector(addr, Arc::new(move || Ok(tls.clone()))))
            .await
            .map_err(ClientError::Connect)?;
        Ok(Self {
            channel,
            token: None,
        })
    }

    /// A client that connects at its first request, and again whenever the
    /// connection is lost, each time with a configuration from `tls`: the CA
    /// may be down when the agent starts, or restart with a new certificate.
    pub fn lazy(addr: &str, tls: TlsSource) -> Result<Self, ClientError> {
        let channel = endpoint(addr)?.connect_with_connector_lazy(connector(addr, tls));
        Ok(Self {
            channel,
            token: None,
        })
    }

    /// Sends the token in `file` (read again for each request: the kubelet
    /// rotates projected tokens) as `authorization: Bearer`, as Istio's
    /// agents do.
    pub fn with_token(self, file: &Path) -> Self {
        Self {
            token: Some(file.to_owned()),
            ..self
        }
    }

    /// Asks for a certificate for the PEM CSR `csr_pem`, valid `ttl` (the CA
    /// may shorten it); returns the PEM chain as the CA sent it, leaf first.
    pub async fn create_certificate(
        &self,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<Vec<String>, ClientError> {
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem.to_owned(),
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: None,
        });
        if let Some(path) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", bearer(path).await?);
        }
        let response = IstioCertificateServiceClient::new(self.channel.clone())
            .create_certificate(request)
            .await
            .map_err(ClientError::Request)?;
        let chain = response.into_inner().cert_chain;
        if chain.is_empty() {
            return Err(ClientError::BadAnswer("empty certificate chain".into()));
        }
        Ok(chain)
    }
}

fn endpoint(addr: &str) -> Result<Endpoint, ClientError> {
    // The URI only satisfies tonic: the connector decides where to go.
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| ClientError::Address(addr.to_owned()))?
        .timeout(TIMEOUT)
        .connect_timeout(TIMEOUT))
}

type CaStream = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

fn connector(
    addr: &str,
    tls: TlsSource,
) -> impl tower::Service<
    http::Uri,
    Response = CaStream,
    Error = io::Error,
    Future = impl Future<Output = io::Result<CaStream>> + Send,
> + Send
+ Clone
+ 'static {
    let addr = addr.to_owned();
    tower::service_fn(move |_| {
        let addr = addr.clone();
        let tls = tls();
        async move {
            let tls = tls.map_err(|e| io::Error::other(e.to_string()))?;
            connect_tls(addr, tls).await
        }
    })
}

async fn connect_tls(addr: String, tls: Arc<ClientConfig>) -> io::Result<CaStream> {
    let connect = async {
        let tcp = TcpStream::connect(&addr).await?;
        tcp.set_nodelay(true)?;
        // No SNI is sent and the verifier checks the SPIFFE ID instead, so
        // the name only satisfies the API.
        let name = ServerName::try_from("warren-ca").expect("a valid DNS name");
        TlsConnector::from(tls).connect(name, tcp).await
    };
    match tokio::time::timeout(TIMEOUT, connect).await {
        Ok(stream) => stream.map(TokioIo::new),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connecting to the CA at {addr} took longer than {TIMEOUT:?}"),
        )),
    }
}

/// `Bearer <token>` from a token file, which must hold one token.
async fn bearer(path: &Path) -> Result<MetadataValue<Ascii>, ClientError> {
    let token_error = |reason: String| ClientError::Token {
        path: path.to_owned(),
        reason,
    };
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| token_error(format!("cannot read it: {e}")))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(token_error("it is empty".into()));
    }
    // Never echo the token itself in an error.
    let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
        .parse()
        .map_err(|_| token_error("it holds characters a token cannot have".into()))?;
    // Kept out of HTTP/2's header compression tables.
    value.set_sensitive(true);
    Ok(value)
}
