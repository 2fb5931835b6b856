//! The receiving end of HBONE: CONNECT streams on one established connection.

use std::future::Future;

use bytes::Bytes;
use h2::{RecvStream, SendStream, server::SendResponse};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    CONNECTION_WINDOW, MAX_FRAME_SIZE, Refusal, SEND_BUFFER, SERVER_MAX_HEADER_LIST,
    SERVER_MAX_STREAMS, STREAM_WINDOW,
};

/// Serves the HTTP/2 connection on `io` (already authenticated by TLS):
/// every request is handed to `handler` on its own task. When `wind_down`
/// completes (the certificate this connection was made with has been
/// replaced, say), the client is told to go away (GOAWAY) and streams in
/// flight finish. Returns when the connection is over, or with the error
/// that ended it.
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
                Some(request) => {
                    let (request, respond) = request?;
                    tokio::spawn(handler(request, respond));
                }
                None => return Ok(()),
            },
            () = &mut wind_down, if !winding_down => {
                winding_down = true;
                connection.graceful_shutdown();
            }
        }
    }
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
