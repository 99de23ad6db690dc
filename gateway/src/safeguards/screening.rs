//! Screening requests and answers with the safeguard rules ([`carrel_core::safeguards`]): the
//! operator's sets plus each institution's, compiled once per institution and cached until its
//! settings change.
//!
//! - **Before** the quota is reserved (stage 5), the prompt is screened with the rules for the
//!   model's tier and the caller's audience (a patron counted as a minor, or an adult). A block
//!   is a 400 `content_blocked`; for a minor its message is the institution's friendly refusal.
//! - **After**, when rules apply to the answer (for minors and around frontier models, as the
//!   operator and institutions configure): a JSON answer is read whole and screened; a stream
//!   is screened as it passes, over a sliding window of its text, and a block ends it with a
//!   final SSE error event before the blocked words reach the client.
//! - Every block or flag is an incident record ([`IncidentDesk`]), without the text unless the
//!   institution opted in for the tier; high-severity ones notify the institution's webhooks.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use carrel_core::config::{ModerationConfig, ModerationFailure, SafeguardsConfig};
use carrel_core::domain::{Principal, Tier};
use carrel_core::safeguards::{
    Action, Audience, CompiledRules, Direction, Hit, Screening, Severity, compile, request_hash,
};
use carrel_core::store::{AutomaticIncident, NewIncident, SafeguardSettings, Store, StoreError};
use dashmap::DashMap;
use http_body::{Body, Frame, SizeHint};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::body::ResponseBody;
use crate::error::{BoxError, GatewayError};
use crate::metering::body::event_end;
use crate::upstream::{SideClient, side_client};

/// Most text of an answer held to screen it (its last part).
pub const OUTPUT_WINDOW: usize = 4096;
/// Incidents waiting to be written; beyond this they are dropped and counted.
const INCIDENT_QUEUE: usize = 1024;

/// An institution's compiled rules and settings.
#[derive(Debug)]
pub struct InstitutionRules {
    /// Operator's sets plus the institution's.
    pub rules: CompiledRules,
    /// What the institution set.
    pub settings: SafeguardSettings,
    /// What a minor reads on a block.
    pub minor_refusal: String,
}

/// Screening state shared by the workers.
#[derive(Debug)]
pub struct Screener {
    config: SafeguardsConfig,
    /// The operator's rules alone: what applies when an institution's cannot be read.
    operator: Arc<InstitutionRules>,
    by_institution: DashMap<Arc<str>, Arc<InstitutionRules>>,
    /// Bumped by every eviction: rules compiled from settings read before an eviction are not
    /// cached after it (they may be the old ones).
    generation: AtomicU64,
    incidents: mpsc::Sender<IncidentJob>,
    /// Whether opted-in prompt text may be kept (only with the embedded store: on Redis it
    /// would stay in the shared log past its retention).
    text_allowed: bool,
    /// The external moderation service, if configured.
    moderation: Option<Moderation>,
    /// Keys incidents' request hashes.
    pepper: carrel_core::keys::Pepper,
    /// What `/metrics` shows of the safeguards.
    pub counters: Arc<SafeguardCounters>,
}

/// Counters of the safeguards, for `/metrics`.
#[derive(Debug, Default)]
pub struct SafeguardCounters {
    /// Incidents recorded: flag, block, dropped (queue full).
    pub incidents: [AtomicU64; 3],
    /// Notifications: sent, refused, failed.
    pub notifications: [AtomicU64; 3],
    /// Moderation checks: passed, flagged, failed.
    pub moderation: [AtomicU64; 3],
}

/// A request's screening context, kept for the answer.
#[derive(Debug, Clone)]
pub struct OutputScreen {
    rules: Arc<InstitutionRules>,
    audience: Audience,
    tier: Tier,
    incident: IncidentCtx,
    /// Whether the rules screen answers here (else only the moderation hook does).
    by_rules: bool,
    /// A frontier answer also goes to the moderation hook, failing closed.
    moderate: bool,
}

/// What an incident record needs besides the screening.
#[derive(Debug, Clone)]
struct IncidentCtx {
    institution: Arc<str>,
    model: Arc<str>,
    tier: Tier,
}

/// One incident to record.
#[derive(Debug)]
struct IncidentJob {
    ctx: IncidentCtx,
    screening: Screening,
    direction: Direction,
    request_hash: String,
    text: Option<(String, i64)>,
    notify: Vec<String>,
}

impl Screener {
    /// The screener; the returned receiver goes to [`run_incident_desk`].
    pub fn new(
        config: SafeguardsConfig,
        text_allowed: bool,
        pepper: carrel_core::keys::Pepper,
    ) -> Result<(Self, IncidentQueue), carrel_core::safeguards::RuleError> {
        let rules = compile(&config.sets, &[])?;
        let operator = Arc::new(InstitutionRules {
            rules,
            settings: SafeguardSettings::default(),
            minor_refusal: config.minor_refusal.clone(),
        });
        let (tx, rx) = mpsc::channel(INCIDENT_QUEUE);
        let moderation = config
            .moderation
            .clone()
            .and_then(|c| match Moderation::new(c) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::error!(error = %e, "no HTTPS client for the moderation service");
                    None
                }
            });
        let counters = Arc::new(SafeguardCounters::default());
        Ok((
            Screener {
                counters: Arc::clone(&counters),
                moderation,
                pepper,
                config,
                operator,
                by_institution: DashMap::new(),
                generation: AtomicU64::new(0),
                incidents: tx,
                text_allowed,
            },
            IncidentQueue(rx, counters),
        ))
    }

    /// The frontier rate of a principal: a tenth (by default) of the tightest requests-per-minute
    /// limit of its institution, site, group and key, or the configured default when none
    /// applies. Counted per key in a one-minute window in the shared short-lived state, so it
    /// holds across replicas; a store that cannot count fails closed.
    pub async fn frontier_rate(
        &self,
        store: &Store,
        limits: &carrel_core::quota::LimitsTable,
        principal: &Principal,
    ) -> Result<(), GatewayError> {
        use carrel_core::quota::{Level, LimitKind, Refusal};
        let levels = [
            (Level::Institution, Some(&principal.institution_id)),
            (Level::Site, principal.site_id.as_ref()),
            (Level::Group, principal.group_id.as_ref()),
            (Level::Key, Some(&principal.key_id)),
        ];
        let base = levels
            .into_iter()
            .filter_map(|(level, id)| limits.get(level, id?)?.requests_per_minute)
            .min();
        let limit = base.map_or(self.config.frontier_requests_per_minute, |rpm| {
            (rpm / self.config.frontier_rate_divisor).max(1)
        });
        let name = format!("frontier-rpm:{}", principal.key_id);
        let n = store
            .count_attempt(&name, Duration::from_secs(60))
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "cannot count frontier requests; failing closed");
                GatewayError::SafeguardUnavailable
            })?;
        if n > limit {
            let refusal = Refusal {
                level: Level::Key,
                kind: LimitKind::RequestsPerMinute,
                limit,
                remaining: 0,
                retry_after_secs: 60,
                resets_at: None,
            };
            return Err(GatewayError::OverLimit {
                refusal,
                message: format!(
                    "Frontier models allow this key {limit} requests a minute (a stricter rate \
                     than other models). Try again within a minute."
                ),
            });
        }
        Ok(())
    }

    /// Checks an institution's sets against the operator's: what `PUT …/safeguards` accepts.
    pub fn check_settings(&self, settings: &SafeguardSettings) -> Result<(), String> {
        compile(&self.config.sets, &settings.sets)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The rules of an institution, compiled at first use and cached.
    pub async fn rules_for(
        &self,
        store: &Store,
        institution: &Arc<str>,
    ) -> Result<Arc<InstitutionRules>, StoreError> {
        if let Some(r) = self.by_institution.get(institution) {
            return Ok(Arc::clone(&r));
        }
        let generation = self.generation.load(Ordering::Acquire);
        let settings = store.safeguard_settings(institution).await?;
        let rules = if settings.sets.is_empty() {
            self.operator.rules.clone()
        } else {
            compile(&self.config.sets, &settings.sets).map_err(|e| {
                // Validated when set; a stored set that no longer compiles (the operator's
                // rules changed under it) is reported, and the operator's rules apply.
                tracing::error!(institution = %institution, error = %e,
                    "institution's safeguard rules do not compile; the operator's apply");
                StoreError::Corrupt(format!("safeguard rules of {institution}: {e}"))
            })?
        };
        let compiled = Arc::new(InstitutionRules {
            rules,
            minor_refusal: settings
                .minor_refusal
                .clone()
                .unwrap_or_else(|| self.config.minor_refusal.clone()),
            settings,
        });
        if self.generation.load(Ordering::Acquire) == generation {
            self.by_institution
                .insert(Arc::clone(institution), Arc::clone(&compiled));
            // An eviction that raced the insert: drop what may be stale.
            if self.generation.load(Ordering::Acquire) != generation {
                self.by_institution.remove(institution);
            }
        }
        Ok(compiled)
    }

    /// Forgets an institution's compiled rules (its settings changed).
    pub fn evict(&self, institution: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.by_institution.remove(institution);
    }

    /// Forgets every institution's.
    pub fn evict_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.by_institution.clear();
    }

    /// Screens a prompt (the pipeline's safeguards stage). `Ok(Some(..))`: the answer must be
    /// screened too.
    pub async fn screen_request(
        &self,
        store: &Store,
        principal: &Principal,
        model: &Arc<str>,
        tier: Tier,
        text: &str,
    ) -> Result<Option<OutputScreen>, GatewayError> {
        let rules = match self.rules_for(store, &principal.institution_id).await {
            Ok(rules) => rules,
            // Around frontier models a safeguard that cannot be read fails closed.
            Err(_) if tier == Tier::Frontier => return Err(GatewayError::SafeguardUnavailable),
            Err(_) => Arc::clone(&self.operator),
        };
        let audience = if principal.is_minor() {
            Audience::Minor
        } else {
            Audience::Adult
        };
        let incident = IncidentCtx {
            institution: Arc::clone(&principal.institution_id),
            model: Arc::clone(model),
            tier,
        };
        let screening = rules
            .rules
            .screen(text, tier.as_str(), audience, Direction::Input);
        if screening.has_hits() {
            self.report(&rules, &incident, &screening, Direction::Input, text);
        }
        if screening.is_blocked() {
            return Err(blocked(&rules, audience, &screening));
        }
        if let Some(moderation) = &self.moderation
            && moderation.config.tiers.contains(&tier)
        {
            match moderation.check(text).await {
                Ok(None) => {
                    self.counters.moderation[0].fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(categories)) => {
                    self.counters.moderation[1].fetch_add(1, Ordering::Relaxed);
                    let screening = moderation_block(&categories);
                    self.report(&rules, &incident, &screening, Direction::Input, text);
                    return Err(blocked(&rules, audience, &screening));
                }
                Err(e) => {
                    self.counters.moderation[2].fetch_add(1, Ordering::Relaxed);
                    let closed = tier == Tier::Frontier
                        || moderation.config.on_failure == ModerationFailure::Block;
                    tracing::warn!(error = %e, fails_closed = closed,
                        "the moderation service could not be consulted");
                    if closed {
                        return Err(GatewayError::SafeguardUnavailable);
                    }
                }
            }
        }
        let by_rules = rules
            .rules
            .screens(tier.as_str(), audience, Direction::Output);
        // Around frontier models the answer is screened after as well as before: by the
        // moderation hook when there is one.
        let moderate = tier == Tier::Frontier
            && self
                .moderation
                .as_ref()
                .is_some_and(|m| m.config.tiers.contains(&tier));
        Ok((by_rules || moderate).then(|| OutputScreen {
            rules,
            audience,
            tier,
            incident,
            by_rules,
            moderate,
        }))
    }

    /// Checks a whole answer with the moderation hook, when the screen asks for it (frontier
    /// answers): flagged is a block, and a hook that cannot be consulted fails closed.
    pub async fn moderate_answer(
        &self,
        screen: &OutputScreen,
        text: &str,
    ) -> Result<(), GatewayError> {
        let Some(moderation) = self.moderation.as_ref().filter(|_| screen.moderate) else {
            return Ok(());
        };
        match moderation.check(text).await {
            Ok(None) => {
                self.counters.moderation[0].fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(Some(categories)) => {
                self.counters.moderation[1].fetch_add(1, Ordering::Relaxed);
                let screening = moderation_block(&categories);
                self.report(
                    &screen.rules,
                    &screen.incident,
                    &screening,
                    Direction::Output,
                    text,
                );
                Err(blocked(&screen.rules, screen.audience, &screening))
            }
            Err(e) => {
                self.counters.moderation[2].fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "the moderation service could not check an answer; \
                    failing closed");
                Err(GatewayError::SafeguardUnavailable)
            }
        }
    }

    /// Screens an answer's text; `Err` when it is blocked.
    pub fn screen_answer(&self, screen: &OutputScreen, text: &str) -> Result<(), GatewayError> {
        self.screen_output(screen, text, None)
    }

    /// [`Screener::screen_answer`] for a stream, screened again as it grows: a rule already
    /// reported for this stream (in `seen`) is not reported again.
    fn screen_output(
        &self,
        screen: &OutputScreen,
        text: &str,
        seen: Option<&mut HashSet<String>>,
    ) -> Result<(), GatewayError> {
        if !screen.by_rules {
            return Ok(());
        }
        let screening = screen.rules.rules.screen(
            text,
            screen.tier.as_str(),
            screen.audience,
            Direction::Output,
        );
        let new = match seen {
            Some(seen) => {
                // Every hit is noted, not only up to the first new one.
                let mut new = false;
                for hit in &screening.hits {
                    new |= seen.insert(hit.rule_id.clone());
                }
                new
            }
            None => true,
        };
        if screening.has_hits() && new {
            self.report(
                &screen.rules,
                &screen.incident,
                &screening,
                Direction::Output,
                text,
            );
        }
        if screening.is_blocked() {
            Err(blocked(&screen.rules, screen.audience, &screening))
        } else {
            Ok(())
        }
    }

    fn report(
        &self,
        rules: &InstitutionRules,
        ctx: &IncidentCtx,
        screening: &Screening,
        direction: Direction,
        text: &str,
    ) {
        let retention = rules
            .settings
            .retain_prompts
            .iter()
            .find(|r| r.tier == ctx.tier)
            .filter(|_| self.text_allowed);
        let job = IncidentJob {
            ctx: ctx.clone(),
            screening: screening.clone(),
            direction,
            request_hash: self
                .pepper
                .incident_hash(&request_hash(&ctx.institution, text)),
            text: retention.map(|r| {
                let until = carrel_core::domain::unix_now() + i64::from(r.days) * 86_400;
                (text.to_owned(), until)
            }),
            notify: if screening.notifies() {
                rules.settings.notify_urls.clone()
            } else {
                Vec::new()
            },
        };
        if self.incidents.try_send(job).is_err() {
            self.counters.incidents[2].fetch_add(1, Ordering::Relaxed);
            tracing::warn!("incident queue full: an incident record was dropped");
        }
    }
}

/// What a flag of the moderation hook counts as: a block, named by the hook's categories.
fn moderation_block(categories: &str) -> Screening {
    Screening::from_hits(vec![Hit {
        rule_id: "moderation".to_owned(),
        category: format!("moderation:{categories}"),
        severity: Severity::Medium,
        action: Action::Block,
        obfuscated: false,
    }])
}

fn blocked(rules: &InstitutionRules, audience: Audience, screening: &Screening) -> GatewayError {
    let message = match audience {
        Audience::Minor => rules.minor_refusal.clone(),
        Audience::Adult => format!(
            "This was blocked by the safeguards of this service ({}).",
            screening.categories().join(", ")
        ),
    };
    GatewayError::ContentBlocked { message }
}

/// The receiving end of the incident queue.
#[derive(Debug)]
pub struct IncidentQueue(mpsc::Receiver<IncidentJob>, Arc<SafeguardCounters>);

/// Writes incident records and sends notifications, for the life of the runtime.
pub async fn run_incident_desk(mut queue: IncidentQueue, store: Store) {
    let counters = Arc::clone(&queue.1);
    let notifier = match Notifier::new(Arc::clone(&counters)) {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::error!(error = %e, "no HTTPS client for incident notifications");
            None
        }
    };
    while let Some(job) = queue.0.recv().await {
        let inst = store
            .get_institution(&job.ctx.institution)
            .await
            .ok()
            .flatten();
        let action = job.screening.verdict;
        let record = AutomaticIncident {
            institution: job.ctx.institution.to_string(),
            sector: inst.as_ref().and_then(|i| i.sector.clone()),
            region: inst.map(|i| i.region).unwrap_or_default(),
            model: job.ctx.model.to_string(),
            tier: job.ctx.tier.as_str().to_owned(),
            category: job.screening.categories().join(","),
            action: action.as_str().to_owned(),
            severity: job
                .screening
                .max_severity
                .map_or("low", |s| s.as_str())
                .to_owned(),
            near_miss: action == carrel_core::safeguards::Verdict::Block,
            direction: match job.direction {
                Direction::Input => "input",
                Direction::Output => "output",
            }
            .to_owned(),
            request_hash: job.request_hash,
        };
        let record = serde_json::to_value(&record).unwrap_or_default();
        let written = store
            .record_incident(NewIncident {
                source: "automatic".to_owned(),
                institution_id: Some(job.ctx.institution.to_string()),
                record: record.clone(),
                prompt_text: job.text,
            })
            .await;
        let id = match written {
            Ok(incident) => incident.id,
            Err(e) => {
                tracing::error!(error = %e, "could not record an incident");
                continue;
            }
        };
        counters.incidents[usize::from(action == carrel_core::safeguards::Verdict::Block)]
            .fetch_add(1, Ordering::Relaxed);
        if let Some(notifier) = &notifier {
            for url in &job.notify {
                notifier.send(url, &id, &record).await;
            }
        }
    }
}

/// A client of an OpenAI-compatible moderation service (`POST /v1/moderations`).
#[derive(Debug)]
struct Moderation {
    config: ModerationConfig,
    client: SideClient<http_body_util::Full<Bytes>>,
}

/// Largest moderation answer read.
const MAX_MODERATION_BYTES: usize = 256 * 1024;

#[derive(Deserialize)]
struct ModerationAnswer {
    results: Vec<ModerationResult>,
}

#[derive(Deserialize)]
struct ModerationResult {
    flagged: bool,
    #[serde(default)]
    categories: std::collections::BTreeMap<String, serde_json::Value>,
}

impl Moderation {
    fn new(config: ModerationConfig) -> Result<Self, rustls::Error> {
        let client = side_client(config.timeout)?;
        Ok(Moderation { config, client })
    }

    /// `Ok(None)`: not flagged; `Ok(Some(categories))`: flagged, with the categories it named;
    /// `Err`: the service could not be consulted.
    async fn check(&self, text: &str) -> Result<Option<String>, String> {
        let mut body = serde_json::json!({"input": text});
        if let Some(model) = &self.config.model {
            body["model"] = model.clone().into();
        }
        let mut req = http::Request::post(self.config.url.as_str())
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(key) = &self.config.api_key {
            let mut value = http::HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| "the moderation API key is not a valid header value")?;
            value.set_sensitive(true);
            req = req.header(http::header::AUTHORIZATION, value);
        }
        let req = req
            .body(http_body_util::Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let call = async {
            let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                return Err(format!("the moderation service answered {}", resp.status()));
            }
            let body = crate::body::read_whole(
                http_body_util::BodyExt::boxed(http_body_util::BodyExt::map_err(
                    resp.into_body(),
                    |e| Box::new(e) as BoxError,
                )),
                MAX_MODERATION_BYTES,
            )
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the moderation answer is too large")?;
            let answer: ModerationAnswer = serde_json::from_slice(&body)
                .map_err(|e| format!("the moderation answer does not parse: {e}"))?;
            if answer.results.is_empty() {
                return Err("the moderation answer has no results".to_owned());
            }
            let flagged: Vec<&str> = answer
                .results
                .iter()
                .filter(|r| r.flagged)
                .flat_map(|r| {
                    r.categories
                        .iter()
                        .filter(|(_, v)| v.as_bool() == Some(true))
                        .map(|(k, _)| k.as_str())
                })
                .collect();
            Ok(answer
                .results
                .iter()
                .any(|r| r.flagged)
                .then(|| flagged.join(",")))
        };
        tokio::time::timeout(self.config.timeout, call)
            .await
            .map_err(|_| "the moderation service timed out".to_owned())?
    }
}

/// Posts high-severity incidents to an institution's webhooks.
struct Notifier {
    counters: Arc<SafeguardCounters>,
    client: SideClient<http_body_util::Full<Bytes>>,
}

/// How long one notification may take.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(5);

impl Notifier {
    fn new(counters: Arc<SafeguardCounters>) -> Result<Self, rustls::Error> {
        let client = side_client(NOTIFY_TIMEOUT)?;
        Ok(Notifier { counters, client })
    }

    async fn send(&self, url: &str, id: &str, record: &serde_json::Value) {
        let body = serde_json::json!({"type": "carrel.incident", "id": id, "incident": record});
        let Ok(req) = http::Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(Bytes::from(body.to_string())))
        else {
            tracing::warn!("an incident webhook URL is not a valid URI");
            return;
        };
        match tokio::time::timeout(NOTIFY_TIMEOUT, self.client.request(req)).await {
            Ok(Ok(resp)) if resp.status().is_success() => {
                self.counters.notifications[0].fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(resp)) => {
                self.counters.notifications[1].fetch_add(1, Ordering::Relaxed);
                tracing::warn!(status = %resp.status(), "an incident webhook refused a notification");
            }
            _ => {
                self.counters.notifications[2].fetch_add(1, Ordering::Relaxed);
                tracing::warn!("an incident webhook could not be reached");
            }
        }
    }
}

/// A stream screened as it passes: each event's text joins a window of the answer's latest
/// [`OUTPUT_WINDOW`] bytes, screened before the event goes on; a block ends the stream with
/// an SSE error event instead.
pub struct ScreenedStream {
    inner: ResponseBody,
    screener: Arc<Screener>,
    screen: OutputScreen,
    partial: BytesMut,
    window: String,
    /// Rules already reported for this stream.
    reported: HashSet<String>,
    /// For the moderation hook (frontier): the answer so far (its last [`MODERATED_TEXT`]
    /// bytes), and the `[DONE]` event held until the hook has checked it.
    full: String,
    held_done: Option<Bytes>,
    /// The hook's verdict on the whole answer, once asked.
    verdict: Option<tokio::sync::oneshot::Receiver<Result<(), GatewayError>>>,
    ready: VecDeque<Bytes>,
    ended: bool,
}

/// Most text of a streamed answer sent to the moderation hook (its end).
pub const MODERATED_TEXT: usize = 64 * 1024;

impl ScreenedStream {
    /// Screens `inner`.
    pub fn new(inner: ResponseBody, screener: Arc<Screener>, screen: OutputScreen) -> Self {
        ScreenedStream {
            inner,
            screener,
            screen,
            partial: BytesMut::new(),
            window: String::new(),
            reported: HashSet::new(),
            full: String::new(),
            held_done: None,
            verdict: None,
            ready: VecDeque::new(),
            ended: false,
        }
    }

    /// Takes in a frame; false when the stream is blocked.
    fn feed(&mut self, data: &[u8]) -> bool {
        self.partial.extend_from_slice(data);
        while let Some(end) = event_end(&self.partial) {
            let event = self.partial.split_to(end).freeze();
            let text = event_text(&event);
            if self.screen.moderate {
                if is_done(&event) {
                    self.held_done = Some(event);
                    continue;
                }
                push_tail(&mut self.full, &text, MODERATED_TEXT);
            }
            if !text.is_empty() {
                self.window.push_str(&text);
                if self.window.len() > OUTPUT_WINDOW {
                    let mut cut = self.window.len() - OUTPUT_WINDOW;
                    while !self.window.is_char_boundary(cut) {
                        cut += 1;
                    }
                    self.window.drain(..cut);
                }
                if let Err(e) = self.screener.screen_output(
                    &self.screen,
                    &self.window,
                    Some(&mut self.reported),
                ) {
                    self.ready.push_back(e.sse_event());
                    return false;
                }
            }
            self.ready.push_back(event);
        }
        if self.partial.len() > crate::metering::body::MAX_EVENT_BYTES {
            // An event too long to hold cannot be screened: a screened stream fails closed.
            let error = GatewayError::ContentBlocked {
                message: "The answer could not be checked, so it was stopped.".into(),
            };
            self.ready.push_back(error.sse_event());
            return false;
        }
        true
    }
}

/// Appends `text` to `buf`, keeping its last `max` bytes.
fn push_tail(buf: &mut String, text: &str, max: usize) {
    buf.push_str(text);
    if buf.len() > max {
        let mut cut = buf.len() - max;
        while !buf.is_char_boundary(cut) {
            cut += 1;
        }
        buf.drain(..cut);
    }
}

/// Whether an SSE event is the stream's `data: [DONE]`.
fn is_done(event: &[u8]) -> bool {
    event.split(|b| *b == b'\n').any(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line.strip_prefix(b"data:").map(<[u8]>::trim_ascii) == Some(&b"[DONE]"[..])
    })
}

impl ScreenedStream {
    /// Asks the moderation hook about the whole answer, off the body's poll.
    fn ask_moderation(&mut self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (screener, screen) = (Arc::clone(&self.screener), self.screen.clone());
        let text = std::mem::take(&mut self.full);
        #[expect(
            clippy::disallowed_methods,
            reason = "one bounded call (the hook's timeout) whose answer the stream waits for; \
                      if the stream is dropped the answer is dropped with it"
        )]
        tokio::spawn(async move {
            let _ = tx.send(screener.moderate_answer(&screen, &text).await);
        });
        self.verdict = Some(rx);
    }
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    message: Option<Delta>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

/// The generated text of one SSE event (empty for others).
fn event_text(event: &[u8]) -> String {
    let mut out = String::new();
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:").map(<[u8]>::trim_ascii) else {
            continue;
        };
        if let Ok(chunk) = serde_json::from_slice::<Chunk>(data) {
            out.push_str(&choice_text(&chunk.choices));
        }
    }
    out
}

fn choice_text(choices: &[ChunkChoice]) -> String {
    let mut out = String::new();
    for c in choices {
        for piece in [
            c.delta.as_ref().and_then(|d| d.content.as_deref()),
            c.message.as_ref().and_then(|d| d.content.as_deref()),
            c.text.as_deref(),
        ]
        .into_iter()
        .flatten()
        {
            out.push_str(piece);
        }
    }
    out
}

/// The generated text of a whole JSON answer (chat or completion).
pub fn answer_text(body: &[u8]) -> String {
    serde_json::from_slice::<Chunk>(body)
        .map(|c| choice_text(&c.choices))
        .unwrap_or_default()
}

impl Body for ScreenedStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if let Some(bytes) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            if let Some(verdict) = &mut this.verdict {
                let outcome = match Pin::new(verdict).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(outcome)) => outcome,
                    Poll::Ready(Err(_)) => Err(GatewayError::SafeguardUnavailable),
                };
                this.verdict = None;
                match outcome {
                    Ok(()) => this.ready.extend(this.held_done.take()),
                    Err(e) => this.ready.push_back(e.sse_event()),
                }
                this.ended = true;
                continue;
            }
            if this.ended {
                return Poll::Ready(None);
            }
            if this.held_done.is_some() {
                // The answer is complete: the hook decides whether `[DONE]` or an error ends
                // it. The provider's body is done with.
                this.inner = crate::body::full(Bytes::new());
                this.ask_moderation();
                continue;
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    if !this.partial.is_empty() {
                        this.ready.push_back(this.partial.split().freeze());
                    }
                    if this.screen.moderate {
                        // Ended without `[DONE]`: checked all the same.
                        this.ask_moderation();
                    } else {
                        this.ended = true;
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if !this.feed(&data) {
                            this.ended = true;
                            // Dropping the metered body settles what was generated and
                            // cancels the provider's work.
                            this.inner = crate::body::full(Bytes::new());
                        }
                    }
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.ready.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
