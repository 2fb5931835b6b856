//! Relaying bytes between a TCP connection and an HTTP/2 stream.
//!
//! Each direction is a loop that holds at most one chunk in memory; HTTP/2
//! flow control does the rest. We hand the peer more receive window only
//! after the bytes were written to the socket, and send only as much as the
//! peer's window allows, so a slow reader slows the writer at the far end
//! instead of filling a buffer here.
//!
//! Half-close is preserved both ways: EOF from the socket becomes END_STREAM,
//! and END_STREAM from the peer becomes shutdown(SHUT_WR) on the socket,
//! while the other direction keeps flowing.

use std::io;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest chunk read from the socket at once.
const CHUNK: usize = 64 * 1024;

/// Bytes relayed each way: (socket → stream, stream → socket).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    pub sent: u64,
    pub received: u64,
}

/// Relays until both directions have finished. On an error on the socket
/// side the stream is reset (CANCEL); on an error on the stream side the
/// socket and the stream handles are dropped, which closes the socket and
/// resets the stream too.
pub async fn relay<S>(
    socket: S,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
) -> io::Result<Relayed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut reader, mut writer) = tokio::io::split(socket);
    let upstream = async {
        let result = socket_to_stream(&mut reader, &mut send).await;
        if result.is_err() {
            send.send_reset(h2::Reason::CANCEL);
        }
        result
    };
    let downstream = stream_to_socket(&mut recv, &mut writer);
    let (sent, received) = tokio::try_join!(upstream, downstream)?;
    Ok(Relayed { sent, received })
}

async fn socket_to_stream<R: AsyncRead + Unpin>(
    reader: &mut R,
    send: &mut SendStream<Bytes>,
) -> io::Result<u64> {
    let mut total = 0;
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        buf.reserve(CHUNK);
        let n = reader.read_buf(&mut buf).await?;
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
            return Ok(total);
        }
        total += n as u64;
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
                .await
                .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "HTTP/2 stream closed"))?
                .map_err(h2_to_io)?;
            send.send_data(chunk.split_to(granted.min(chunk.len())), false)
                .map_err(h2_to_io)?;
        }
    }
}

async fn stream_to_socket<W: AsyncWrite + Unpin>(
    recv: &mut RecvStream,
    writer: &mut W,
) -> io::Result<u64> {
    let mut total = 0;
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_to_io)?;
        writer.write_all(&chunk).await?;
        total += chunk.len() as u64;
        // Only now may the peer send more.
        recv.flow_control()
            .release_capacity(chunk.len())
            .map_err(h2_to_io)?;
    }
    writer.shutdown().await?;
    Ok(total)
}

pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().expect("checked is_io")
    } else {
        io::Error::other(e)
    }
}
