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

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpStream, tcp},
};

/// What TLS carries in one record at most (TLS 1.3: 2^14 bytes).
const RECORD: usize = 16 * 1024;
/// An HTTP/2 frame header.
const FRAME_HEADER: usize = 9;
/// How much one read from the socket takes, at first: an idle or chatty
/// connection holds little.
const FIRST_CHUNK: usize = 1024;
/// The most one read takes, for bulk transfers. Each step up is a whole
/// number of TLS records less the frame's header, so that a full chunk, sent
/// as one DATA frame, fills its records exactly: a chunk of a round size
/// left its frame header's 9 bytes over, to go in a tiny record (and, with
/// TCP_NODELAY, a packet) of their own.
const CHUNK_STEPS: [usize; 3] = [
    RECORD - FRAME_HEADER,
    4 * RECORD - FRAME_HEADER,
    16 * RECORD - FRAME_HEADER,
];

/// The size of the next read: grows a step each time a read filled the
/// whole chunk (a bulk flow), never shrinks.
fn next_chunk(current: usize, filled: bool) -> usize {
    if !filled {
        return current;
    }
    CHUNK_STEPS
        .into_iter()
        .find(|&step| step > current)
        .unwrap_or(current)
}

/// The most a TLS connection carrying HBONE queues for the socket: a full
/// chunk's frame goes to TLS in one write (rustls's default, 64 KiB, took
/// the largest only in parts), with room for a few small frames besides.
/// It is also what a peer that stops reading pins per connection.
pub const TLS_SEND_LIMIT: usize = 20 * RECORD;

/// Bytes relayed each way: (socket → stream, stream → socket).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    pub sent: u64,
    pub received: u64,
}

/// A socket the relay can carry: its two directions apart, each driven by
/// its own future without a lock between them (`tokio::io::split` took
/// one on every poll), and a read side that says when it has data, so that
/// a connection waiting for its next bytes holds no buffer for them.
pub trait Duplex {
    type Reader<'a>: AsyncRead + Readable + Unpin
    where
        Self: 'a;
    type Writer<'a>: AsyncWrite + Unpin
    where
        Self: 'a;
    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>);
}

/// A read side that can wait until it has something to read.
pub trait Readable {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Duplex for TcpStream {
    type Reader<'a> = tcp::ReadHalf<'a>;
    type Writer<'a> = tcp::WriteHalf<'a>;

    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        self.split()
    }
}

impl Readable for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

impl Readable for tcp::ReadHalf<'_> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_read_ready(cx)
    }
}

/// Relays until both directions have finished. On an error on the socket
/// side the stream is reset (CANCEL); on an error on the stream side the
/// socket and the stream handles are dropped, which closes the socket and
/// resets the stream too.
pub async fn relay<S: Duplex>(
    mut socket: S,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
) -> io::Result<Relayed> {
    let (mut reader, mut writer) = socket.halves();
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

async fn socket_to_stream<R: AsyncRead + Readable + Unpin>(
    reader: &mut R,
    send: &mut SendStream<Bytes>,
) -> io::Result<u64> {
    let mut total = 0;
    let mut size = FIRST_CHUNK;
    loop {
        let Some(mut chunk) = std::future::poll_fn(|cx| poll_chunk(reader, cx, size)).await? else {
            send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
            return Ok(total);
        };
        total += chunk.len() as u64;
        size = next_chunk(size, chunk.len() >= size);
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

/// Reads what the socket has, up to `size` bytes; None at EOF. A short
/// read is copied out of its chunk, so that what h2 queues weighs what it
/// carries: a flow that once grew its chunks to 256 KiB, then trickles,
/// must not pin 256 KiB per byte.
fn poll_chunk<R: AsyncRead + Readable + Unpin>(
    reader: &mut R,
    cx: &mut Context<'_>,
    size: usize,
) -> Poll<io::Result<Option<Bytes>>> {
    let mut buf = BytesMut::new();
    let n = ready!(poll_fill(reader, cx, &mut buf, size))?;
    Poll::Ready(Ok(match n {
        0 => None,
        n if n < size / 4 => Some(Bytes::copy_from_slice(&buf)),
        _ => Some(buf.freeze()),
    }))
}

/// Reads up to `size` bytes into `buf`, which must be empty: the bytes
/// read, 0 at EOF. Memory is taken only for a read that finds bytes, and
/// given back (`buf` left without any) if it finds none after all
/// (readiness can outlive the bytes that caused it), at EOF, or on an
/// error: a connection waiting for its next bytes holds none.
pub(super) fn poll_fill<R: AsyncRead + Readable + Unpin>(
    reader: &mut R,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    size: usize,
) -> Poll<io::Result<usize>> {
    debug_assert!(buf.is_empty());
    ready!(reader.poll_read_ready(cx))?;
    buf.reserve(size);
    // Exactly `size`: whether a read filled it is what grows the relay's
    // chunks.
    let mut limited = (&mut *reader).take(size as u64);
    let read = tokio_util::io::poll_read_buf(Pin::new(&mut limited), cx, buf);
    match read {
        Poll::Ready(Ok(n)) if n > 0 => Poll::Ready(Ok(n)),
        other => {
            *buf = BytesMut::new();
            other
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn chunks_come_in_order_none_while_idle_and_none_at_eof() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut app = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut proxy, _) = listener.accept().await.unwrap();
        let (mut reader, _writer) = proxy.halves();
        async fn next(
            reader: &mut tcp::ReadHalf<'_>,
            size: usize,
        ) -> Result<io::Result<Option<Bytes>>, tokio::time::error::Elapsed> {
            tokio::time::timeout(
                Duration::from_millis(100),
                std::future::poll_fn(|cx| poll_chunk(reader, cx, size)),
            )
            .await
        }
        // Exactly one chunk's worth: read whole.
        app.write_all(&[7; FIRST_CHUNK]).await.unwrap();
        let chunk = next(&mut reader, FIRST_CHUNK).await.unwrap().unwrap();
        assert_eq!(chunk.unwrap().len(), FIRST_CHUNK);
        // Nothing more sent: the next, larger read waits (holding nothing).
        assert!(next(&mut reader, CHUNK_STEPS[0]).await.is_err());
        // A short read is what was sent, in order.
        app.write_all(b"hello").await.unwrap();
        let chunk = next(&mut reader, CHUNK_STEPS[0]).await.unwrap().unwrap();
        assert_eq!(chunk.as_deref(), Some(&b"hello"[..]));
        app.shutdown().await.unwrap();
        assert_eq!(
            next(&mut reader, CHUNK_STEPS[0]).await.unwrap().unwrap(),
            None
        );
    }

    #[test]
    fn chunks_grow_while_reads_fill_them_and_full_ones_fill_whole_records() {
        let mut size = FIRST_CHUNK;
        assert_eq!(next_chunk(size, false), size, "a short read keeps the size");
        let mut sizes = vec![size];
        while next_chunk(size, true) != size {
            size = next_chunk(size, true);
            sizes.push(size);
        }
        assert_eq!(sizes, [1024, 16_375, 65_527, 262_135]);
        for step in CHUNK_STEPS {
            assert_eq!((step + FRAME_HEADER) % RECORD, 0, "{step}");
            // The chunk's frame goes to TLS in one write.
            assert!(step + FRAME_HEADER <= TLS_SEND_LIMIT);
            assert!(step <= crate::hbone::MAX_FRAME_SIZE as usize);
        }
    }
}
