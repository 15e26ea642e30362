//! Load generator for `bench/run store`: drives our store or etcd with N closed-loop clients
//! and prints one JSON line (throughput, latency percentiles).
//!
//! Fairness: every client has its own TCP connection and keeps exactly one request in flight
//! (closed loop), on both systems. Ours speaks its binary protocol; etcd is driven through its
//! v3 JSON gateway (`POST /v3/kv/put`, `POST /v3/kv/range`, linearizable by default) over
//! HTTP/1.1 keep-alive, pointed at etcd's leader so neither side pays a forwarding hop.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use rand::Rng;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Target {
    Ours,
    Etcd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Workload {
    Put,
    Get,
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum)]
    target: Target,
    #[arg(long, value_enum)]
    workload: Workload,
    /// Comma-separated client addresses (host:port); for etcd the leader first.
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    #[arg(long, default_value_t = 1)]
    clients: usize,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    #[arg(long, default_value_t = 1000)]
    keys: usize,
}

fn base64(input: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A minimal HTTP/1.1 keep-alive client for etcd's JSON gateway.
struct HttpConnection {
    host: String,
    stream: BufReader<TcpStream>,
}

impl HttpConnection {
    async fn connect(host: &str) -> Result<Self> {
        let stream = TcpStream::connect(host)
            .await
            .with_context(|| format!("connect to etcd at {host}"))?;
        stream.set_nodelay(true)?;
        Ok(HttpConnection {
            host: host.into(),
            stream: BufReader::new(stream),
        })
    }

    async fn post(&mut self, path: &str, body: &str) -> Result<()> {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        if !line.starts_with("HTTP/1.1 200") {
            bail!("etcd answered {line:?}");
        }
        let mut content_length = None;
        let mut chunked = false;
        loop {
            line.clear();
            self.stream.read_line(&mut line).await?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                content_length = Some(v.trim().parse::<usize>()?);
            } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        if let Some(n) = content_length {
            let mut body = vec![0; n];
            self.stream.read_exact(&mut body).await?;
        } else if chunked {
            loop {
                line.clear();
                self.stream.read_line(&mut line).await?;
                let size = usize::from_str_radix(line.trim(), 16)?;
                let mut chunk = vec![0; size + 2];
                self.stream.read_exact(&mut chunk).await?;
                if size == 0 {
                    break;
                }
            }
        } else {
            bail!("etcd answer has neither a length nor chunks");
        }
        Ok(())
    }
}

async fn client_loop(args: Arc<Args>, index: usize, until: Instant) -> Result<Vec<Duration>> {
    let mut latencies = Vec::new();
    let value: Vec<u8> = (0..args.value_size)
        .map(|i| b'a' + (i % 26) as u8)
        .collect();
    let key_of = |n: usize| format!("/bench/key{n:06}");
    match args.target {
        Target::Ours => {
            let client = cluster::Client::new(args.endpoints.clone())?;
            // Warm up: find the leader before measuring.
            client.put(&key_of(index), value.clone()).await?;
            while Instant::now() < until {
                let key = key_of(rand::thread_rng().gen_range(0..args.keys));
                let started = Instant::now();
                match args.workload {
                    Workload::Put => {
                        client.put(&key, value.clone()).await?;
                    }
                    Workload::Get => {
                        client.get(&key).await?;
                    }
                }
                latencies.push(started.elapsed());
            }
        }
        Target::Etcd => {
            let mut http = HttpConnection::connect(&args.endpoints[0]).await?;
            let value64 = base64(&value);
            http.post(
                "/v3/kv/put",
                &format!(
                    r#"{{"key":"{}","value":"{value64}"}}"#,
                    base64(key_of(index).as_bytes())
                ),
            )
            .await?;
            while Instant::now() < until {
                let key = base64(key_of(rand::thread_rng().gen_range(0..args.keys)).as_bytes());
                let started = Instant::now();
                match args.workload {
                    Workload::Put => {
                        http.post(
                            "/v3/kv/put",
                            &format!(r#"{{"key":"{key}","value":"{value64}"}}"#),
                        )
                        .await?
                    }
                    Workload::Get => {
                        http.post("/v3/kv/range", &format!(r#"{{"key":"{key}"}}"#))
                            .await?
                    }
                }
                latencies.push(started.elapsed());
            }
        }
    }
    Ok(latencies)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank].as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    if args.endpoints.is_empty() {
        bail!("--endpoints is required");
    }
    let until = Instant::now() + Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.clients)
        .map(|i| tokio::spawn(client_loop(args.clone(), i, until)))
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let line = serde_json::json!({
        "ops": latencies.len(),
        "ops_per_s": latencies.len() as f64 / elapsed,
        "p50_ms": percentile(&latencies, 50.0),
        "p99_ms": percentile(&latencies, 99.0),
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    Ok(())
}
