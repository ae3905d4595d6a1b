//! The load generator's HTTP/1.1 client: one keep-alive connection a worker, one request at a
//! time, one write and usually one read a request.

use std::fmt::Write as _;
use std::net::SocketAddr;

use tokio::net::TcpStream;

/// Where the callbacks go: an `http://` URL, resolved once.
pub(super) struct Target {
    /// The host and port of the URL (80 by default), resolved once for every connection.
    pub(super) address: SocketAddr,
    /// Request line and fixed headers, up to the `Content-Length` value.
    pub(super) head: String,
}

impl Target {
    pub(super) async fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url}: only http:// targets are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(format!("{url}: no host"));
        }
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let address = tokio::net::lookup_host(&with_port)
            .await
            .map_err(|e| format!("{url}: cannot resolve {authority}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url}: {authority} has no address"))?;
        Ok(Target {
            address,
            head: format!(
                "POST {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: tencent-css-exporter-load\r\nContent-Type: application/json\r\nContent-Length: "
            ),
        })
    }
}

/// One HTTP/1.1 keep-alive connection that sends one request at a time.
///
/// Deliberately minimal, so the load generator costs far less CPU than the server it measures:
/// one write and usually one read per request, no pooling, no extra tasks.
pub(super) struct Connection<'a> {
    /// Where to connect, and the head every request starts with.
    target: &'a Target,
    /// The open connection; `None` before the first request, and after an error or a close.
    stream: Option<TcpStream>,
    /// The request being sent, reused so that a request allocates nothing.
    request: Vec<u8>,
    /// The answer being read, reused like `request`.
    response: Vec<u8>,
}

impl<'a> Connection<'a> {
    pub(super) fn new(target: &'a Target) -> Self {
        Connection {
            target,
            stream: None,
            request: Vec::with_capacity(1024),
            response: Vec::with_capacity(4096),
        }
    }

    pub(super) fn close(&mut self) {
        self.stream = None;
    }

    /// Posts `body` and returns the status of the answer; the connection is reopened after an
    /// error or a `Connection: close`.
    pub(super) async fn post(&mut self, body: &[u8]) -> Result<u16, String> {
        let result = self.exchange(body).await;
        match &result {
            Ok((_, keep_alive)) if *keep_alive => {}
            _ => self.close(),
        }
        result.map(|(status, _)| status)
    }

    async fn exchange(&mut self, body: &[u8]) -> Result<(u16, bool), String> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.target.address)
                .await
                .map_err(|e| format!("connect to {}: {e}", self.target.address))?;
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            self.stream = Some(stream);
        }
        let stream = self.stream.as_mut().expect("connected above");
        self.request.clear();
        self.request.extend_from_slice(self.target.head.as_bytes());
        let _ = write!(Bytes(&mut self.request), "{}\r\n\r\n", body.len());
        self.request.extend_from_slice(body);
        write_all(stream, &self.request)
            .await
            .map_err(|e| format!("send: {e}"))?;

        self.response.clear();
        let head_end = loop {
            if let Some(i) = find(&self.response, b"\r\n\r\n") {
                break i + 4;
            }
            read_more(stream, &mut self.response).await?;
        };
        let head = std::str::from_utf8(&self.response[..head_end])
            .map_err(|_| "answer head is not text".to_string())?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let mut length = None;
        let mut chunked = false;
        let mut keep_alive = status_line.starts_with("HTTP/1.1");
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<usize>().map_err(|_| "bad content-length")?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                keep_alive = !value.eq_ignore_ascii_case("close");
            }
        }
        if chunked {
            let mut at = head_end;
            loop {
                let line_end = loop {
                    if let Some(i) = find(&self.response[at..], b"\r\n") {
                        break at + i;
                    }
                    read_more(stream, &mut self.response).await?;
                };
                let size = std::str::from_utf8(&self.response[at..line_end])
                    .ok()
                    .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
                    .ok_or("bad chunk size")?;
                at = line_end + 2;
                if size == 0 {
                    // Trailers (usually none), then the empty line.
                    loop {
                        match find(&self.response[at..], b"\r\n") {
                            Some(0) => break,
                            Some(i) => at += i + 2,
                            None => read_more(stream, &mut self.response).await?,
                        }
                    }
                    break;
                }
                while self.response.len() < at + size + 2 {
                    read_more(stream, &mut self.response).await?;
                }
                at += size + 2;
            }
        } else if let Some(length) = length {
            while self.response.len() < head_end + length {
                read_more(stream, &mut self.response).await?;
            }
        } else if !(status == 204 || status == 304 || (100..200).contains(&status)) {
            // No length: the body runs to the end of the connection.
            loop {
                match read_some(stream, &mut self.response).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => return Err(format!("receive: {e}")),
                }
            }
            keep_alive = false;
        }
        Ok((status, keep_alive))
    }
}

/// `write!` into a byte buffer.
struct Bytes<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    match read_some(stream, buf).await {
        Ok(0) => Err("connection closed before the answer was complete".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("receive: {e}")),
    }
}

/// Writes all of `buf`, trying first and waiting for the socket only when it is full.
async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match stream.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Appends what the socket has (waiting for something); 0 at the end of the connection.
async fn read_some(stream: &TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let filled = buf.len();
    buf.resize(filled + 4096, 0);
    let result = loop {
        stream.readable().await?;
        match stream.try_read(&mut buf[filled..]) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            other => break other,
        }
    };
    buf.truncate(filled + *result.as_ref().unwrap_or(&0));
    result
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves each accepted connection the canned answers in turn, one per request.
    async fn canned(answers: Vec<&'static str>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut answers = answers.into_iter();
            while let Ok((stream, _)) = listener.accept().await {
                let mut buf = Vec::new();
                loop {
                    // A request is complete once its body (Content-Length) is in.
                    let complete = find(&buf, b"\r\n\r\n").is_some_and(|end| {
                        let head = std::str::from_utf8(&buf[..end])
                            .unwrap()
                            .to_ascii_lowercase();
                        let length: usize = head
                            .split("content-length: ")
                            .nth(1)
                            .and_then(|v| v.split("\r\n").next()?.parse().ok())
                            .unwrap();
                        buf.len() >= end + 4 + length
                    });
                    if complete {
                        buf.clear();
                        let Some(answer) = answers.next() else { return };
                        write_all(&stream, answer.as_bytes()).await.unwrap();
                        if answer.contains("Connection: close") {
                            break;
                        }
                    } else if read_some(&stream, &mut buf).await.unwrap_or(0) == 0 {
                        break;
                    }
                }
            }
        });
        format!("http://{address}/callback")
    }

    #[tokio::test]
    async fn client_reads_length_chunked_and_closing_answers() {
        let url = canned(vec![
            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{\"code\":0}",
            "HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{\"co\r\n6\r\nde\":1}\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n",
        ])
        .await;
        let target = Target::parse(&url).await.unwrap();
        let mut c = Connection::new(&target);
        assert_eq!(c.post(b"{}").await, Ok(200));
        assert_eq!(c.post(b"{\"a\":1}").await, Ok(503));
        assert_eq!(c.post(b"{}").await, Ok(200));
        assert!(c.stream.is_none(), "closed as the server asked");
        assert_eq!(c.post(b"{}").await, Ok(401));
        assert!(Target::parse("https://x/callback").await.is_err());
    }
}
