//! `serve`: one model, loaded once, behind NeMo's `PUT /generate` and an OpenAI-compatible
//! API, on axum (tokio). The model runs on its own thread and takes requests from a
//! bounded queue, one generation at a time; a full queue answers 503.

pub mod field;
pub mod nemo_api;
pub mod openai;
pub mod worker;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::runtime::load::Model;
use crate::runtime::tokenizer::Tokenizer;
use worker::{GenJob, GenOut, Job, Reply, StreamMsg};

/// What the HTTP side needs to know of the model.
pub struct Info {
    pub tokenizer: Tokenizer,
    pub bos: Option<u32>,
    /// No BOS is needed when there is none (see `Model::bos_optional`).
    pub bos_optional: bool,
    pub max_positions: usize,
    /// Logits per step.
    pub vocab: usize,
    /// The name `/v1/models` lists.
    pub name: String,
}

impl Info {
    /// `text`'s ids after BOS (when `bos`); refused when empty or longer than the context.
    pub fn prompt_ids(&self, text: &str, bos: bool) -> std::result::Result<Vec<u32>, String> {
        let mut ids = Vec::new();
        match (bos, self.bos) {
            (true, Some(b)) => ids.push(b),
            (true, None) if !self.bos_optional => {
                return Err("the tokenizer has no BOS token".into())
            }
            _ => {}
        }
        ids.extend(self.tokenizer.encode(text));
        if ids.is_empty() {
            return Err("a prompt encodes to no tokens".into());
        }
        if ids.len() > self.max_positions {
            return Err(format!(
                "a prompt has {} tokens; the model's context is {}",
                ids.len(),
                self.max_positions
            ));
        }
        Ok(ids)
    }
}

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct Config {
    pub host: String,
    pub port: u16,
    /// Requests waiting beyond the one running.
    pub queue: usize,
    /// Largest request body, bytes.
    pub max_body: usize,
    /// Worker threads of the model (0: all cores).
    pub threads: usize,
}

#[derive(Clone)]
struct App {
    jobs: mpsc::SyncSender<Job>,
    info: Arc<Info>,
    next_id: Arc<AtomicU64>,
    queue: usize,
}

/// A request not served: its status and why.
struct Refusal(StatusCode, String);

impl Refusal {
    fn response(self) -> Response {
        error(self.0, self.1)
    }
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({"error": msg.into()}))).into_response()
}

/// One log line per request.
fn log(
    method: &Method,
    path: &str,
    status: StatusCode,
    prompt: usize,
    generated: usize,
    wait: f64,
    t0: Instant,
) {
    eprintln!(
        "{method} {path} {} prompt_tokens={prompt} generated_tokens={generated} queue_wait={wait:.3}s time={:.3}s",
        status.as_u16(),
        t0.elapsed().as_secs_f64()
    );
}

/// Reads a JSON body; the body-size limit and bad JSON are 400s.
fn body_json(
    body: std::result::Result<Bytes, BytesRejection>,
) -> std::result::Result<Value, String> {
    let b = body.map_err(|e| format!("unreadable body: {e}"))?;
    serde_json::from_slice(&b).map_err(|e| format!("invalid JSON: {e}"))
}

impl App {
    /// Queues `gens`; a full queue is 503.
    fn enqueue(
        &self,
        gens: Vec<GenJob>,
        reply: Reply,
    ) -> std::result::Result<Arc<Mutex<f64>>, Refusal> {
        let wait = Arc::new(Mutex::new(0.0));
        let job = Job {
            gens,
            enqueued: Instant::now(),
            reply,
            wait: wait.clone(),
        };
        let busy = StatusCode::SERVICE_UNAVAILABLE;
        match self.jobs.try_send(job) {
            Ok(()) => Ok(wait),
            Err(mpsc::TrySendError::Full(_)) => Err(Refusal(
                busy,
                format!(
                    "the queue is full ({} requests waiting); try again later",
                    self.queue
                ),
            )),
            Err(mpsc::TrySendError::Disconnected(_)) => {
                Err(Refusal(busy, "the server is shutting down".into()))
            }
        }
    }

    /// Runs `gens` and waits for all of them.
    async fn run(&self, gens: Vec<GenJob>) -> std::result::Result<(Vec<GenOut>, f64), Refusal> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let wait = self.enqueue(gens, Reply::Whole(tx))?;
        let outs = rx.await.map_err(|_| {
            Refusal(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the model thread stopped".into(),
            )
        })?;
        let outs: std::result::Result<Vec<GenOut>, String> = outs.into_iter().collect();
        let w = *wait.lock().expect("not poisoned");
        outs.map(|o| (o, w))
            .map_err(|e| Refusal(StatusCode::BAD_REQUEST, e))
    }
}

async fn nemo_generate(
    State(app): State<App>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let t0 = Instant::now();
    let req = match body_json(body).and_then(|v| nemo_api::parse(&v, &app.info)) {
        Ok(r) => r,
        Err(e) => {
            log(
                &Method::PUT,
                "/generate",
                StatusCode::BAD_REQUEST,
                0,
                0,
                0.0,
                t0,
            );
            return error(StatusCode::BAD_REQUEST, e);
        }
    };
    let prompt: usize = req.jobs.iter().map(|j| j.ids.len()).sum();
    let (resp, status, generated, wait) = match app.run(req.jobs.clone()).await {
        Ok((outs, w)) => {
            let n = outs.iter().map(|o| o.g.ids.len()).sum();
            let v = nemo_api::response(&req, &outs, &app.info.tokenizer);
            (Json(v).into_response(), StatusCode::OK, n, w)
        }
        Err(r) => {
            let s = r.0;
            (r.response(), s, 0, 0.0)
        }
    };
    log(
        &Method::PUT,
        "/generate",
        status,
        prompt,
        generated,
        wait,
        t0,
    );
    resp
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn openai_any(
    app: App,
    kind: openai::Kind,
    path: &'static str,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let t0 = Instant::now();
    let req = match body_json(body).and_then(|v| openai::parse(kind, &v, &app.info)) {
        Ok(r) => r,
        Err(e) => {
            log(&Method::POST, path, StatusCode::BAD_REQUEST, 0, 0, 0.0, t0);
            return error(StatusCode::BAD_REQUEST, e);
        }
    };
    let n = app.next_id.fetch_add(1, Ordering::Relaxed);
    let id = format!(
        "{}-{n}",
        if kind == openai::Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }
    );
    let created = unix_now();
    let prompt: usize = req.jobs.iter().map(|j| j.ids.len()).sum();
    if req.stream {
        return stream(app, req, id, created, path, t0, prompt);
    }
    match app.run(req.jobs.clone()).await {
        Ok((outs, w)) => {
            let g = outs.iter().map(|o| o.g.ids.len()).sum();
            log(&Method::POST, path, StatusCode::OK, prompt, g, w, t0);
            Json(openai::response(&req, &outs, &id, created, &app.info)).into_response()
        }
        Err(r) => {
            log(&Method::POST, path, r.0, prompt, 0, 0.0, t0);
            r.response()
        }
    }
}

/// Server-sent events: a chunk per text delta, a last chunk with the finish reason, then
/// `[DONE]`.
fn stream(
    app: App,
    req: openai::Request,
    id: String,
    created: u64,
    path: &'static str,
    t0: Instant,
    prompt: usize,
) -> Response {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let wait = match app.enqueue(req.jobs.clone(), Reply::Stream(tx, gone.clone())) {
        Ok(w) => w,
        Err(r) => {
            log(&Method::POST, path, r.0, prompt, 0, 0.0, t0);
            return r.response();
        }
    };
    let (etx, erx) =
        tokio::sync::mpsc::unbounded_channel::<std::result::Result<Event, Infallible>>();
    tokio::spawn(async move {
        let send = |v: Value| etx.send(Ok(Event::default().data(v.to_string()))).is_ok();
        if req.kind == openai::Kind::Chat {
            send(openai::chunk(&req, &id, created, Some(""), None));
        }
        let mut generated = 0;
        let mut cancelled = false;
        while let Some(m) = rx.recv().await {
            match m {
                StreamMsg::Delta(s) => {
                    if !send(openai::chunk(&req, &id, created, Some(&s), None)) {
                        // The client went away: the worker stops at its next token.
                        gone.store(true, Ordering::Relaxed);
                    }
                }
                StreamMsg::Done(done) => match *done {
                    Ok(o) => {
                        generated = o.g.ids.len();
                        cancelled = o.g.stop == crate::runtime::generate::Stop::Cancelled;
                        let finish = openai::finish_reason(&o.g.stop);
                        send(openai::chunk(&req, &id, created, None, Some(finish)));
                    }
                    Err(e) => {
                        send(json!({"error": {"message": e}}));
                    }
                },
            }
        }
        let _ = etx.send(Ok(Event::default().data("[DONE]")));
        let w = *wait.lock().expect("not poisoned");
        let path = if cancelled {
            format!("{path} (client gone, stopped)")
        } else {
            path.to_string()
        };
        log(
            &Method::POST,
            &path,
            StatusCode::OK,
            prompt,
            generated,
            w,
            t0,
        );
    });
    Sse::new(tokio_stream::wrappers::UnboundedReceiverStream::new(erx)).into_response()
}

async fn models(State(app): State<App>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": app.info.name, "object": "model", "created": 0, "owned_by": "steerlm-convert"
    }]}))
}

async fn not_found(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no route {method} {}", uri.path()),
    )
}

/// Stops accepting on Ctrl-C or SIGTERM (in-flight and queued requests are still answered).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("shutting down: answering the requests already accepted");
}

/// Serves `model` until Ctrl-C or SIGTERM; `ready` gets the bound address.
pub fn run(model: Model, name: String, cfg: &Config, ready: impl FnOnce(SocketAddr)) -> Result<()> {
    let info = Arc::new(Info {
        tokenizer: model.tokenizer.clone(),
        bos: model.bos,
        bos_optional: model.bos_optional,
        max_positions: model.weights.dims.max_positions,
        vocab: model.weights.dims.vocab,
        name,
    });
    let (jobs, rx) = mpsc::sync_channel::<Job>(cfg.queue);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.threads)
        .build()
        .map_err(|e| Error::Usage(format!("cannot start {} threads: {e}", cfg.threads)))?;
    let worker = std::thread::spawn(move || pool.install(|| worker::serve_jobs(&model, rx)));
    let app = App {
        jobs,
        info,
        next_id: Arc::new(AtomicU64::new(0)),
        queue: cfg.queue,
    };
    let router = Router::new()
        .route("/generate", put(nemo_generate))
        .route(
            "/v1/completions",
            post(|State(a): State<App>, b| {
                openai_any(a, openai::Kind::Completion, "/v1/completions", b)
            }),
        )
        .route(
            "/v1/chat/completions",
            post(|State(a): State<App>, b| {
                openai_any(a, openai::Kind::Chat, "/v1/chat/completions", b)
            }),
        )
        .route("/v1/models", get(models))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(cfg.max_body))
        .with_state(app);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Usage(format!("cannot start the HTTP runtime: {e}")))?;
    let addr = format!("{}:{}", cfg.host, cfg.port);
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| Error::Usage(format!("cannot listen on {addr}: {e}")))?;
        let local = listener.local_addr().map_err(|e| Error::io(&addr, e))?;
        ready(local);
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|e| Error::io(&addr, e))
    })?;
    drop(rt);
    let _ = worker.join();
    eprintln!("stopped");
    Ok(())
}
