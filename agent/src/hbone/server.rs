//! The receiving end of HBONE: CONNECT streams on one established connection.

use std::future::Future;

use bytes::Bytes;
use h2::{RecvStream, SendStream, server::SendResponse};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::{
    CONNECTION_WINDOW, MAX_FRAME_SIZE, Refusal, SEND_BUFFER, SERVER_MAX_HEADER_LIST,
    SERVER_MAX_STREAMS, STREAM_WINDOW,
};

/// Serves the HTTP/2 connection on `io` (already authenticated by TLS):
/// every request is handed to `handler` on its own task. When `wind_down`
/// completes (the certificate this connection was made with has been
/// replaced, say), the client is told to go away (GOAWAY) and streams in
/// flight finish. Returns when the connection is over, or with the error
/// that ended it; a client that leaves once told to go away, however it
/// closes, has not failed.
pub async fn serve<IO, H, F, W>(io: IO, wind_down: W, handler: H) -> Result<(), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(http::Request<RecvStream>, SendResponse<Bytes>) -> F,
    F: Future<Output = ()> + Send + 'static,
    W: Future<Output = ()>,
{
    let mut connection = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(SERVER_MAX_STREAMS)
        .max_header_list_size(SERVER_MAX_HEADER_LIST)
        .max_send_buffer_size(SEND_BUFFER)
        .handshake(io)
        .await?;
    let mut wind_down = std::pin::pin!(wind_down);
    let mut winding_down = false;
    // Polling accept() also drives the connection: PINGs, flow control,
    // the streams' data.
    loop {
        tokio::select! {
            request = connection.accept() => match request {
                Some(Ok((request, respond))) => {
                    tokio::spawn(handler(request, respond));
                }
                Some(Err(error)) if winding_down && peer_left(&error) => {
                    // Streams it cut short say so in their own access lines.
                    debug!(%error, "HBONE client left after the GOAWAY");
                    return Ok(());
                }
                Some(Err(error)) => return Err(error),
                None => return Ok(()),
            },
            () = &mut wind_down, if !winding_down => {
                winding_down = true;
                connection.graceful_shutdown();
            }
        }
    }
}

/// The peer closed or reset the connection under us. After a GOAWAY that
/// is how a client with nothing in flight leaves: it has no reason to wait
/// for the PING that follows the GOAWAY, and our write of it meets the
/// reset its close caused.
fn peer_left(error: &h2::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    error
        .get_io()
        .is_some_and(|io| matches!(io.kind(), BrokenPipe | ConnectionReset | UnexpectedEof))
}

/// Answers a CONNECT with 200: the tunnel is up, the returned stream carries
/// bytes to the client.
pub fn accept(respond: &mut SendResponse<Bytes>) -> Result<SendStream<Bytes>, h2::Error> {
    let response = http::Response::builder()
        .status(http::StatusCode::OK)
        .body(())
        .expect("a bare 200 is well-formed");
    respond.send_response(response, false)
}

/// Answers a CONNECT with the refusal's status and ends the stream.
pub fn refuse(respond: &mut SendResponse<Bytes>, refusal: &Refusal) {
    let response = http::Response::builder()
        .status(refusal.status())
        .body(())
        .expect("a bare status is well-formed");
    // The client may already be gone; nothing more to do then.
    let _ = respond.send_response(response, true);
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        pin::Pin,
        sync::{Arc, Mutex},
        task::{Context, Poll},
        time::Duration,
    };

    use tokio::{
        io::{DuplexStream, ReadBuf},
        sync::oneshot,
    };

    use super::*;
    use crate::hbone::{Trace, connect_request};

    /// The server's end of an in-memory connection that can be cut as a
    /// peer's reset cuts a TCP connection: from then on every write fails
    /// with the error kind it was cut with, and nothing more is read.
    struct Cuttable {
        inner: DuplexStream,
        cut: Arc<Mutex<Option<io::ErrorKind>>>,
    }

    impl Cuttable {
        fn cut(&self) -> Option<io::ErrorKind> {
            *self.cut.lock().unwrap()
        }
    }

    impl AsyncRead for Cuttable {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.cut().is_some() {
                // Never woken: the server's writes are what fail.
                return Poll::Pending;
            }
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Cuttable {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if let Some(kind) = self.cut() {
                return Poll::Ready(Err(kind.into()));
            }
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// What happens before the connection is cut.
    #[derive(Clone, Copy)]
    struct Case {
        /// A stream is open (answered 200); otherwise the connection is idle.
        stream: bool,
        /// The server is told to go away.
        wind_down: bool,
        /// The open stream sends a byte (so the server writes).
        speak: bool,
        /// The error the server's writes meet.
        cut_with: io::ErrorKind,
    }

    /// A server past its handshake (a PING answered, or a stream answered)
    /// whose connection is then cut as `case` says; the server's result.
    async fn cut(case: Case) -> Result<(), h2::Error> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let cut = Arc::new(Mutex::new(None));
        let (go_away, going) = oneshot::channel::<()>();
        let (say, said) = oneshot::channel::<()>();
        // The one stream takes it.
        let said = Mutex::new(Some(said));
        let server = tokio::spawn(serve(
            Cuttable {
                inner: server_io,
                cut: cut.clone(),
            },
            async {
                let _ = going.await;
            },
            move |_request, mut respond| {
                let send = accept(&mut respond);
                let said = said.lock().unwrap().take();
                async move {
                    let mut send = send.unwrap();
                    if let Some(said) = said
                        && said.await.is_ok()
                    {
                        let _ = send.send_data(Bytes::from_static(b"x"), false);
                    }
                    std::future::pending::<()>().await;
                }
            },
        ));
        let (mut send, mut connection) = h2::client::handshake(client_io).await.unwrap();
        let mut ping = connection.ping_pong().unwrap();
        let _client = tokio::spawn(connection);
        ping.ping(h2::Ping::opaque()).await.unwrap();
        let _stream = if case.stream {
            let addr = "10.0.0.1:8080".parse().unwrap();
            let (response, stream) = send
                .send_request(connect_request(addr, addr, Trace::start()), false)
                .unwrap();
            assert_eq!(response.await.unwrap().status(), 200);
            Some(stream)
        } else {
            None
        };
        *cut.lock().unwrap() = Some(case.cut_with);
        if case.wind_down {
            go_away.send(()).unwrap();
        }
        if case.speak {
            say.send(()).unwrap();
        }
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server returns once its connection is cut")
            .unwrap()
    }

    const LEAVES: Case = Case {
        stream: false,
        wind_down: true,
        speak: false,
        cut_with: io::ErrorKind::BrokenPipe,
    };

    #[tokio::test]
    async fn a_client_that_leaves_once_told_to_go_away_has_not_failed() {
        // The GOAWAY (and its PING) meet the reset its close caused.
        cut(LEAVES).await.unwrap();
        for cut_with in [io::ErrorKind::ConnectionReset, io::ErrorKind::UnexpectedEof] {
            cut(Case { cut_with, ..LEAVES }).await.unwrap();
        }
        // With a stream still open, too: the stream's own access line
        // says how it ended.
        cut(Case {
            stream: true,
            ..LEAVES
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn other_failures_while_going_away_are_errors() {
        let error = cut(Case {
            cut_with: io::ErrorKind::InvalidData,
            ..LEAVES
        })
        .await
        .unwrap_err();
        assert_eq!(error.get_io().unwrap().kind(), io::ErrorKind::InvalidData);
        assert!(!peer_left(&error));
    }

    #[tokio::test]
    async fn a_connection_cut_while_serving_is_an_error() {
        let error = cut(Case {
            stream: true,
            wind_down: false,
            speak: true,
            cut_with: io::ErrorKind::BrokenPipe,
        })
        .await
        .unwrap_err();
        assert!(peer_left(&error), "{error}");
    }
}
