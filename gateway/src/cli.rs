//! The `carrel` command line: parse it, load config, set up logging, bind, and hand over to
//! [`crate::server::run`]. In the library so that tests can run the real command as a process
//! of its own (`kill -9` and restart), from a binary of the test crate.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::startup::{self, App, InitError, StartOptions};
use carrel_core::config::{Config, LogFormat};
use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Carrel: a Right-to-AI public access gateway for libraries, schools and small businesses.
#[derive(Debug, Parser)]
#[command(
    name = "carrel",
    version,
    about = "Carrel: a Right-to-AI public access gateway for libraries, schools and small businesses."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Run the gateway on a fresh data dir with a built-in demo model, institution and key.
    Demo(ServeArgs),
    /// Print the OpenAPI document of the admin and public APIs.
    Openapi,
    /// Print the JSON Schema of incident reports (`openapi/incident-report.schema.json`).
    IncidentSchema,
    /// Check the signature of a saved response against the gateway's published keys.
    Verify(VerifyArgs),
    /// Replace the response signing key; the old public key stays published. Restart every
    /// replica with the new files afterwards.
    RotateSigningKey(KeyArgs),
    /// The tamper-evident audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the stored audit log against its signed tree heads (and any saved elsewhere):
    /// finds entries rewritten or removed after a head covered them.
    Verify(AuditVerifyArgs),
}

#[derive(Debug, Args)]
struct AuditVerifyArgs {
    /// TOML config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Data directory; overrides server.data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A tree head saved elsewhere (the JSON of `GET /admin/v1/audit/tree-head`, or of
    /// `/admin/v1/audit/tree-heads`); may be given several times.
    #[arg(long)]
    head: Vec<PathBuf>,
    /// The published keys (JSON of `GET /.well-known/carrel/keys`); default: the key files of
    /// the data directory.
    #[arg(long)]
    jwks: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// The keys: a file with the JSON of `GET /.well-known/carrel/keys`.
    #[arg(long)]
    jwks: PathBuf,
    /// The response: what `curl -si` printed (status line, headers, blank line, body), or
    /// JSON `{"status", "headers", "body_b64"}`.
    response: PathBuf,
}

#[derive(Debug, Args)]
struct KeyArgs {
    /// TOML config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Data directory; overrides server.data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML config file (every key is optional; see deploy/carrel.example.toml).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Public listener address; overrides server.listen.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin listener address; overrides server.admin_listen.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Data directory; overrides server.data_dir (demo: a fresh temporary directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// Runs the `carrel` command with the process's arguments.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let (args, demo) = match cli.command {
        Command::Openapi => {
            println!("{}", crate::api_doc::openapi_json());
            return ExitCode::SUCCESS;
        }
        Command::IncidentSchema => {
            let schema = carrel_admin::incidents::report_schema();
            println!(
                "{}",
                serde_json::to_string_pretty(&schema).unwrap_or_default()
            );
            return ExitCode::SUCCESS;
        }
        Command::Serve(args) => (args, false),
        Command::Demo(args) => (args, true),
        Command::Verify(args) => return verify(&args),
        Command::RotateSigningKey(args) => return rotate_signing_key(&args),
        Command::Audit(AuditCommand::Verify(args)) => return audit_verify(&args),
    };

    let mut config = match Config::load_from_env(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("carrel: config error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(addr) = args.listen {
        config.server.listen = addr;
    }
    if let Some(addr) = args.admin_listen {
        config.server.admin_listen = addr;
    }
    // The demo starts on a fresh directory unless told otherwise; it is removed on exit.
    let mut _demo_dir = None;
    match args.data_dir {
        Some(dir) => config.server.data_dir = dir,
        None if demo => match tempfile::Builder::new().prefix("carrel-demo-").tempdir() {
            Ok(dir) => {
                config.server.data_dir = dir.path().to_owned();
                _demo_dir = Some(dir);
            }
            Err(e) => {
                eprintln!("carrel: cannot create a demo data dir: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => {}
    }
    if demo {
        startup::add_demo_model(&mut config);
    }
    init_tracing(&config);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("carrel: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, demo)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("carrel: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `carrel verify`: exit 0 and `ok kid=…` for a response signed by a published key; 1 with the
/// reason otherwise; 2 when the files cannot be read.
fn verify(args: &VerifyArgs) -> ExitCode {
    use carrel_core::signing::Jwks;
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|e| eprintln!("carrel verify: {}: {e}", path.display()))
    };
    let (Ok(jwks), Ok(response)) = (read(&args.jwks), read(&args.response)) else {
        return ExitCode::from(2);
    };
    let jwks: Jwks = match serde_json::from_slice(&jwks) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("carrel verify: {}: not a JWKS: {e}", args.jwks.display());
            return ExitCode::from(2);
        }
    };
    let saved = match parse_saved(&response) {
        Ok(saved) => saved,
        Err(e) => {
            eprintln!("carrel verify: {}: {e}", args.response.display());
            return ExitCode::from(2);
        }
    };
    let result = if saved.is_event_stream() {
        saved.verify_stream(&jwks)
    } else {
        saved.verify(&jwks)
    };
    match result {
        Ok(ok) => {
            println!("ok kid={} created={}", ok.kid, ok.created);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("carrel verify: FAILED: {e}");
            ExitCode::from(1)
        }
    }
}

/// A saved response: the JSON form, or an HTTP/1.x response as `curl -si` prints it.
fn parse_saved(bytes: &[u8]) -> Result<carrel_core::signing::SavedResponse, String> {
    use carrel_core::signing::SavedResponse;
    if bytes.first() == Some(&b'{') {
        return serde_json::from_slice(bytes).map_err(|e| format!("not a saved response: {e}"));
    }
    let head_end = memchr::memmem::find(bytes, b"\r\n\r\n")
        .map(|i| (i, i + 4))
        .or_else(|| memchr::memmem::find(bytes, b"\n\n").map(|i| (i, i + 2)))
        .ok_or("no blank line after the headers")?;
    let head = std::str::from_utf8(&bytes[..head_end.0]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("the first line is not an HTTP status line")?;
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("not a header line: {line:?}"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let pairs = headers.iter().map(|(n, v)| (n.as_str(), v.as_str()));
    Ok(SavedResponse::new(status, pairs, &bytes[head_end.1..]))
}

/// `carrel audit verify`: 0 and a summary when the log holds to every head; 1 and what was
/// tampered with otherwise; 2 when something cannot be read.
fn audit_verify(args: &AuditVerifyArgs) -> ExitCode {
    use carrel_core::audit::TreeHead;
    use carrel_core::signing::Jwks;
    let fail = |message: String| {
        eprintln!("carrel audit verify: {message}");
        ExitCode::from(2)
    };
    let mut config = match Config::load_from_env(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(format!("config error: {e}")),
    };
    if let Some(dir) = &args.data_dir {
        config.server.data_dir = dir.clone();
    }
    let jwks: Jwks = match &args.jwks {
        Some(path) => match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(j) => j,
            Err(e) => return fail(format!("{}: {e}", path.display())),
        },
        None if !config.signing.key_path(&config.server.data_dir).exists() => {
            return fail(format!(
                "no signing key at {}: pass the published keys with --jwks",
                config.signing.key_path(&config.server.data_dir).display()
            ));
        }
        None => match crate::signing::load_ring(&config.signing, &config.server.data_dir) {
            Ok(ring) => ring.jwks(),
            Err(e) => return fail(e.to_string()),
        },
    };
    let mut saved: Vec<TreeHead> = Vec::new();
    for path in &args.head {
        let parsed = std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                #[derive(serde::Deserialize)]
                #[serde(untagged)]
                enum Heads {
                    One(TreeHead),
                    List { data: Vec<TreeHead> },
                }
                match serde_json::from_slice::<Heads>(&b).map_err(|e| e.to_string())? {
                    Heads::One(h) => Ok(vec![h]),
                    Heads::List { data } => Ok(data),
                }
            });
        match parsed {
            Ok(heads) => saved.extend(heads),
            Err(e) => return fail(format!("{}: {e}", path.display())),
        }
    }
    // The embedded store's file, or this replica's view of the shared log.
    let file = config.server.data_dir.join(match config.store.kind {
        carrel_core::config::StoreKind::Embedded => carrel_core::store::DB_FILE,
        carrel_core::config::StoreKind::Redis => carrel_core::store::VIEW_FILE,
    });
    if !file.is_file() {
        return fail(format!("no store at {}", file.display()));
    }
    if args.jwks.is_none() {
        eprintln!(
            "carrel audit verify: note: checking with the keys of the data directory; pass the \
             published keys with --jwks to check against keys its owner cannot change"
        );
    }
    let (log, mut heads) = match carrel_core::audit::read_log(&file) {
        Ok(r) => r,
        Err(e) => return fail(format!("{}: {e}", file.display())),
    };
    let kept = heads.len();
    heads.extend(saved);
    if heads.is_empty() && !log.is_empty() {
        eprintln!(
            "carrel audit verify: no signed tree head to hold the log to: pass one saved \
             elsewhere with --head (GET /admin/v1/audit/tree-head)"
        );
        return ExitCode::from(1);
    }
    match carrel_core::audit::check(&log, &heads, &jwks) {
        Ok(ok) if ok.covered < ok.entries => {
            println!(
                "ok: {} entries; {} tree heads verified ({kept} kept, {} saved elsewhere); \
                 entries 1 to {} are covered by a signed head, the {} after it by none yet",
                ok.entries,
                ok.heads,
                ok.heads - kept,
                ok.covered,
                ok.entries - ok.covered
            );
            ExitCode::SUCCESS
        }
        Ok(ok) => {
            println!(
                "ok: {} entries; {} tree heads verified ({kept} kept, {} saved elsewhere); \
                 entries 1 to {} are covered by a signed head",
                ok.entries,
                ok.heads,
                ok.heads - kept,
                ok.covered
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("carrel audit verify: TAMPERED: {e}");
            ExitCode::from(1)
        }
    }
}

/// `carrel rotate-signing-key`.
fn rotate_signing_key(args: &KeyArgs) -> ExitCode {
    let mut config = match Config::load_from_env(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("carrel: config error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(dir) = &args.data_dir {
        config.server.data_dir = dir.clone();
    }
    match crate::signing::rotate(&config.signing, &config.server.data_dir) {
        Ok((old, new)) => {
            println!("retired kid={old} (still published)\ncurrent kid={new}");
            println!("restart every replica so that they sign with the new key");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("carrel: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Every open stream holds two sockets (the client's and the provider's): a gateway needs far
/// more open files than the usual default soft limit of 1,024. Raise it to the hard limit, as
/// nginx's `worker_rlimit_nofile` and Go's runtime do; what the operator capped stays capped.
fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if let (Some(current), Some(hard)) = (limit.current, limit.maximum)
        && current < hard
    {
        let raised = rustix::process::Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => tracing::info!(from = current, to = hard, "raised the open files limit"),
            Err(e) => {
                tracing::warn!(error = %e, limit = current, "could not raise the open files limit")
            }
        }
    }
}

async fn serve(config: Config, demo: bool) -> Result<(), InitError> {
    let mut opts = StartOptions::from_env();
    if demo && opts.admin_token.is_none() {
        opts.admin_token = Some(format!(
            "carrel-admin-{}",
            carrel_core::ids::random_base62(32)
        ));
    }
    raise_open_files_limit();
    let app = App::build(&config, &opts).await?;
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| InitError::Bind { addr, source })
    };
    let public = bind(config.server.listen).await?;
    let admin = bind(config.server.admin_listen).await?;
    let scheme = if config.server.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let public_url = format!("{scheme}://{}", local_addr(&public));
    let admin_url = format!("http://{}", local_addr(&admin));
    say(&format!("listening public={public_url} admin={admin_url}"));
    if demo {
        let tenant = startup::seed_demo_tenant(&app).await?;
        print_demo_banner(
            &public_url,
            &admin_url,
            &tenant.api_key,
            opts.admin_token.as_deref().unwrap_or_default(),
            &tenant.institution_id,
        );
    }

    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    let router = app.admin_router();
    let server = crate::server::run(
        public,
        admin,
        app.state.clone(),
        router,
        &config.server,
        shutdown,
    );
    // The signal only cancels the token; the server future keeps running so it can drain
    // in-flight requests for server.shutdown_grace_ms before it returns.
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result,
        () = wait_for_signal() => signal.cancel(),
    }
    server.await
}

fn local_addr(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".to_owned())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let terminate = async {
            match term.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            () = terminate => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown signal received");
}

/// Writes one message to stdout in a single write. A closed or broken stdout (`carrel demo |
/// head`) must not take the server down, so errors are ignored.
fn say(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{text}\n").as_bytes());
    let _ = out.flush();
}

fn print_demo_banner(public: &str, admin: &str, key: &str, admin_token: &str, institution: &str) {
    let model = crate::demo::DEMO_MODEL;
    say(&format!(
        r#"
  Carrel demo is running: a Right-to-AI gateway in front of a built-in DEMO model
  ("{model}", not a real AI; it streams the same short answer to every prompt).

  OpenAI API base URL   {public}/v1
  API key               {key}
  Demo model            {model}
  Admin API             {admin}/admin/v1   (bearer token: {admin_token})
  API reference         {admin}/admin/docs
  Health                {public}/healthz

  Usage of the demo library so far (updated as each answer ends):

    curl -H "Authorization: Bearer {admin_token}" \
      "{admin}/admin/v1/institutions/{institution}/usage?group_by=model"

  Try it with curl (streams word by word):

    curl -N {public}/v1/chat/completions \
      -H "Authorization: Bearer {key}" \
      -H "Content-Type: application/json" \
      -d '{{"model":"{model}","stream":true,"messages":[{{"role":"user","content":"Hello, Carrel!"}}]}}'

  Or with the OpenAI Python SDK (pip install openai):

    python3 - <<'PY'
    from openai import OpenAI
    client = OpenAI(base_url="{public}/v1", api_key="{key}")
    for chunk in client.chat.completions.create(
            model="{model}", stream=True,
            messages=[{{"role": "user", "content": "Hello, Carrel!"}}]):
        print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()
    PY

  Data lives in a temporary directory and is removed on exit. Press Ctrl-C to stop.
"#
    ));
}
