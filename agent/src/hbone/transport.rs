//! The socket under an HBONE TLS connection.
//!
//! rustls reads its socket 4 KiB at a time, so a 16 KiB record took four
//! reads (four system calls). Reads here go through a buffer of
//! [`READ_BUFFER`] bytes, one read for several records. The buffer exists
//! only while it holds unread bytes: it is taken once the socket is
//! readable and given back once emptied, so an idle connection (a pooled
//! one between streams, or one a peer opened and left) holds none. Writes
//! go straight through.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::copy::poll_fill;

/// How much one read from the socket takes at most.
pub const READ_BUFFER: usize = 64 * 1024;

#[derive(Debug)]
pub struct Transport {
    tcp: TcpStream,
    /// Read from the socket, not yet by TLS; empty (no memory) otherwise.
    unread: BytesMut,
}

impl Transport {
    pub fn new(tcp: TcpStream) -> Self {
        Self {
            tcp,
            unread: BytesMut::new(),
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if out.remaining() == 0 {
            // Reading nothing must not look like EOF with bytes held back.
            return Poll::Ready(Ok(()));
        }
        if self.unread.is_empty() {
            if out.remaining() >= READ_BUFFER {
                // As large as ours: no point copying twice.
                return Pin::new(&mut self.tcp).poll_read(cx, out);
            }
            let this = &mut *self;
            if ready!(poll_fill(&mut this.tcp, cx, &mut this.unread, READ_BUFFER))? == 0 {
                return Poll::Ready(Ok(())); // EOF
            }
        }
        let n = out.remaining().min(self.unread.len());
        out.put_slice(&self.unread[..n]);
        self.unread.advance(n);
        if self.unread.is_empty() {
            self.unread = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn pair() -> (Transport, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let far = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (near, _) = listener.accept().await.unwrap();
        (Transport::new(near), far)
    }

    #[tokio::test]
    async fn small_reads_take_what_one_socket_read_brought_in_order() {
        let (mut near, mut far) = pair().await;
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let writer = tokio::spawn(async move {
            far.write_all(&sent).await.unwrap();
            far.shutdown().await.unwrap();
            (far, sent)
        });
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        loop {
            let n = near.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
            // Whatever is left over is all that is held.
            assert!(near.unread.len() < READ_BUFFER);
        }
        let (_far, sent) = writer.await.unwrap();
        assert_eq!(got, sent);
        assert_eq!(near.unread.capacity(), 0, "nothing held at EOF");
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer() {
        let (mut near, mut far) = pair().await;
        far.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        near.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(near.unread.capacity(), 0, "given back once emptied");
        // Waiting for more takes no memory either.
        let mut more = [0u8; 1];
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(50), near.read(&mut more)).await;
        assert!(waited.is_err(), "nothing was sent");
        assert_eq!(near.unread.capacity(), 0);
        // Writes go through.
        near.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        far.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
    }
}
