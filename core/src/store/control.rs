//! The writes to control data, as functions of the connection, the change and its
//! [`WriteCtx`]. [`super::write::Command::apply`] calls them; the `Store` methods of the same
//! names propose them.

use rusqlite::{Connection, params};

use super::write::WriteCtx;
use super::{
    InstitutionPatch, KeyPatch, LOCKOUT_FAILURES, LOCKOUT_WINDOW_SECS, NewApiKey, NewInstitution,
    NewModel, NewProvider, NewUser, StoreError, get_institution, get_key, json_names, models_json,
    require_institution, unique_conflict,
};
use crate::config::{ModelConfig, ProviderConfig};
use crate::domain::{
    AdminUser, ApiKey, Group, GroupKind, Institution, InstitutionStatus, Model, OverQuota,
    Provider, Site, Source, Tier,
};

pub(super) fn apply_config(
    c: &mut Connection,
    w: &mut WriteCtx,
    providers: &[ProviderConfig],
    models: &[ModelConfig],
) -> Result<(), StoreError> {
    let tx = c.savepoint()?;
    for p in providers {
        tx.execute(
            "INSERT INTO providers (id, name, kind, base_url, api_key, source, created_at)
             VALUES (?1, ?2, ?3, ?4, NULL, 'config', ?5)
             ON CONFLICT(name) DO UPDATE SET kind = excluded.kind,
                base_url = excluded.base_url, api_key = NULL, source = 'config'",
            params![w.id("prov"), p.name, p.kind.as_str(), p.base_url, w.now()],
        )?;
    }
    for m in models {
        tx.execute(
            "INSERT INTO models (id, name, provider, upstream_model, tier,
                input_price_per_mtok, output_price_per_mtok, source, created_at,
                max_output_tokens, tier_basis, routing, public_cache)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'config', ?8, ?9, ?10, ?11, ?12)
             ON CONFLICT(name) DO UPDATE SET provider = excluded.provider,
                routing = excluded.routing, public_cache = excluded.public_cache,
                upstream_model = excluded.upstream_model, tier = excluded.tier,
                tier_basis = excluded.tier_basis,
                input_price_per_mtok = excluded.input_price_per_mtok,
                output_price_per_mtok = excluded.output_price_per_mtok,
                max_output_tokens = excluded.max_output_tokens,
                source = 'config'",
            params![
                w.id("model"),
                m.name,
                m.provider,
                m.upstream_model,
                m.tier.as_str(),
                m.input_price_per_mtok,
                m.output_price_per_mtok,
                w.now(),
                m.max_output_tokens,
                m.tier_basis.as_str(),
                serde_json::to_string(&m.routing).expect("plain data"),
                serde_json::to_string(&m.public_cache).expect("plain data")
            ],
        )?;
    }
    // Entries dropped from the config file stop being served. A provider that an admin-made
    // model still uses is kept, handed over to the admin API.
    let models_json = json_names(models.iter().map(|m| m.name.as_str()));
    let removed = tx.execute(
        "DELETE FROM models WHERE source = 'config'
         AND name NOT IN (SELECT value FROM json_each(?1))",
        [&models_json],
    )?;
    super::prices::drop_orphans(&tx)?;
    let providers_json = json_names(providers.iter().map(|p| p.name.as_str()));
    let kept = tx.execute(
        "UPDATE providers SET source = 'admin' WHERE source = 'config'
         AND name NOT IN (SELECT value FROM json_each(?1))
         AND name IN (SELECT provider FROM models)",
        [&providers_json],
    )?;
    let removed_providers = tx.execute(
        "DELETE FROM providers WHERE source = 'config'
         AND name NOT IN (SELECT value FROM json_each(?1))",
        [&providers_json],
    )?;
    tx.commit()?;
    if removed + removed_providers > 0 {
        tracing::info!(
            models = removed,
            providers = removed_providers,
            "removed entries no longer in the config file"
        );
    }
    if kept > 0 {
        tracing::warn!(
            providers = kept,
            "providers removed from the config file are still used by admin-made models; \
             kept as admin-managed"
        );
    }
    Ok(())
}

pub(super) fn create_provider(
    c: &mut Connection,
    w: &mut WriteCtx,
    new: NewProvider,
) -> Result<Provider, StoreError> {
    let provider = Provider {
        id: w.id("prov"),
        name: new.name,
        kind: new.kind,
        base_url: new.base_url,
        api_key: new.api_key,
        source: Source::Admin,
        created_at: w.now(),
    };
    c.execute(
        "INSERT INTO providers (id, name, kind, base_url, api_key, source, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, 'admin', ?6)",
        params![
            provider.id,
            provider.name,
            provider.kind.as_str(),
            provider.base_url,
            provider.api_key,
            provider.created_at
        ],
    )
    .map_err(|e| unique_conflict(e, || format!("provider `{}`", provider.name)))?;
    Ok(provider)
}

pub(super) fn create_model(
    c: &mut Connection,
    w: &mut WriteCtx,
    new: NewModel,
) -> Result<Model, StoreError> {
    let exists: bool = c.query_row(
        "SELECT EXISTS(SELECT 1 FROM providers WHERE name = ?1)",
        [&new.provider],
        |r| r.get(0),
    )?;
    if !exists {
        return Err(StoreError::NotFound(format!("provider `{}`", new.provider)));
    }
    let model = Model {
        id: w.id("model"),
        name: new.name,
        provider: new.provider,
        upstream_model: new.upstream_model,
        tier: new.tier,
        tier_basis: new.tier_basis,
        input_price_per_mtok: new.input_price_per_mtok,
        output_price_per_mtok: new.output_price_per_mtok,
        max_output_tokens: new.max_output_tokens,
        routing: new.routing,
        public_cache: new.public_cache,
        source: Source::Admin,
        created_at: w.now(),
    };
    c.execute(
        "INSERT INTO models (id, name, provider, upstream_model, tier,
            input_price_per_mtok, output_price_per_mtok, source, created_at,
            max_output_tokens, tier_basis, routing, public_cache)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'admin', ?8, ?9, ?10, ?11, ?12)",
        params![
            model.id,
            model.name,
            model.provider,
            model.upstream_model,
            model.tier.as_str(),
            model.input_price_per_mtok,
            model.output_price_per_mtok,
            model.created_at,
            model.max_output_tokens,
            model.tier_basis.as_str(),
            serde_json::to_string(&model.routing).expect("plain data"),
            serde_json::to_string(&model.public_cache).expect("plain data")
        ],
    )
    .map_err(|e| unique_conflict(e, || format!("model `{}`", model.name)))?;
    Ok(model)
}

pub(super) fn create_institution(
    c: &mut Connection,
    w: &mut WriteCtx,
    new: NewInstitution,
) -> Result<Institution, StoreError> {
    let inst = Institution {
        id: w.id("inst"),
        name: new.name,
        kind: new.kind,
        region: new.region,
        timezone: new.timezone,
        sector: new.sector,
        status: InstitutionStatus::Active,
        frontier_verified: false,
        over_quota: OverQuota::Reject,
        tier_ceiling: Tier::Frontier,
        minor_tier_ceiling: Tier::Baseline,
        patron_retention_hours: super::DEFAULT_PATRON_RETENTION_HOURS,
        economy: Default::default(),
        created_at: w.now(),
    };
    c.execute(
        "INSERT INTO institutions (id, name, kind, region, timezone, created_at, sector)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            inst.id,
            inst.name,
            inst.kind.as_str(),
            inst.region,
            inst.timezone,
            inst.created_at,
            inst.sector
        ],
    )?;
    Ok(inst)
}

pub(super) fn update_institution(
    c: &mut Connection,
    id: &str,
    patch: InstitutionPatch,
) -> Result<Option<Institution>, StoreError> {
    let tx = c.savepoint()?;
    let Some(mut inst) = get_institution(&tx, id)? else {
        return Ok(None);
    };
    if let Some(name) = patch.name {
        inst.name = name;
    }
    if let Some(sector) = patch.sector {
        inst.sector = sector;
    }
    if let Some(tz) = patch.timezone {
        inst.timezone = tz;
    }
    if let Some(status) = patch.status {
        inst.status = status;
    }
    if let Some(verified) = patch.frontier_verified {
        inst.frontier_verified = verified;
    }
    if let Some(policy) = patch.over_quota {
        inst.over_quota = policy;
    }
    if let Some(tier) = patch.tier_ceiling {
        inst.tier_ceiling = tier;
    }
    if let Some(tier) = patch.minor_tier_ceiling {
        inst.minor_tier_ceiling = tier;
    }
    if let Some(hours) = patch.patron_retention_hours {
        inst.patron_retention_hours = hours;
    }
    let e = &mut inst.economy;
    e.cache_all = patch.cache_all.unwrap_or(e.cache_all);
    e.cache_price_percent = patch.cache_price_percent.unwrap_or(e.cache_price_percent);
    e.allow_fallback = patch.allow_fallback.unwrap_or(e.allow_fallback);
    tx.execute(
        "UPDATE institutions SET name = ?2, sector = ?3, timezone = ?4, status = ?5,
            frontier_verified = ?6, over_quota = ?7, tier_ceiling = ?8,
            minor_tier_ceiling = ?9, patron_retention_hours = ?10, cache_all = ?11,
            cache_price_percent = ?12, allow_fallback = ?13 WHERE id = ?1",
        params![
            inst.id,
            inst.name,
            inst.sector,
            inst.timezone,
            inst.status.as_str(),
            inst.frontier_verified,
            inst.over_quota.as_str(),
            inst.tier_ceiling.as_str(),
            inst.minor_tier_ceiling.as_str(),
            inst.patron_retention_hours,
            inst.economy.cache_all,
            inst.economy.cache_price_percent,
            inst.economy.allow_fallback
        ],
    )?;
    tx.commit()?;
    Ok(Some(inst))
}

pub(super) fn create_key(
    c: &mut Connection,
    w: &WriteCtx,
    new: NewApiKey,
) -> Result<ApiKey, StoreError> {
    require_institution(c, &new.institution_id)?;
    insert_key(c, w, new)
}

/// Inserts a key row; a taken id is a conflict.
fn insert_key(c: &Connection, w: &WriteCtx, new: NewApiKey) -> Result<ApiKey, StoreError> {
    let key = ApiKey {
        id: new.id,
        institution_id: new.institution_id,
        name: new.name,
        kind: new.kind,
        tier_ceiling: new.tier_ceiling,
        created_at: w.now(),
        revoked_at: None,
        expires_at: new.expires_at,
        site_id: new.site_id,
        group_id: new.group_id,
        allowed_models: new.allowed_models,
    };
    c.execute(
        "INSERT INTO api_keys (id, institution_id, name, kind, tier_ceiling, secret_hash,
            created_at, expires_at, site_id, group_id, allowed_models)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            key.id,
            key.institution_id,
            key.name,
            key.kind.as_str(),
            key.tier_ceiling.as_str(),
            &new.secret_hash[..],
            key.created_at,
            key.expires_at,
            key.site_id,
            key.group_id,
            models_json(key.allowed_models.as_deref())
        ],
    )
    .map_err(|e| unique_conflict(e, || format!("key `{}`", key.id)))?;
    Ok(key)
}

pub(super) fn update_key(
    c: &mut Connection,
    id: &str,
    patch: KeyPatch,
) -> Result<Option<ApiKey>, StoreError> {
    let tx = c.savepoint()?;
    let Some(mut key) = get_key(&tx, id)?.filter(|k| k.revoked_at.is_none()) else {
        return Ok(None);
    };
    if let Some(name) = patch.name {
        key.name = name;
    }
    if let Some(tier) = patch.tier_ceiling {
        key.tier_ceiling = tier;
    }
    if let Some(expires_at) = patch.expires_at {
        key.expires_at = expires_at;
    }
    if let Some(allowed) = patch.allowed_models {
        key.allowed_models = allowed;
    }
    tx.execute(
        "UPDATE api_keys SET name = ?2, tier_ceiling = ?3, expires_at = ?4,
            allowed_models = ?5 WHERE id = ?1",
        params![
            key.id,
            key.name,
            key.tier_ceiling.as_str(),
            key.expires_at,
            models_json(key.allowed_models.as_deref())
        ],
    )?;
    tx.commit()?;
    Ok(Some(key))
}

pub(super) fn revoke_key(c: &mut Connection, w: &WriteCtx, id: &str) -> Result<bool, StoreError> {
    let n = c.execute(
        "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
        params![id, w.now()],
    )?;
    Ok(n == 1)
}

pub(super) fn rotate_key(
    c: &mut Connection,
    w: &WriteCtx,
    old: &str,
    new: NewApiKey,
    old_expires_at: &str,
) -> Result<ApiKey, StoreError> {
    let tx = c.savepoint()?;
    let changed = tx.execute(
        "UPDATE api_keys SET expires_at = CASE
            WHEN expires_at IS NULL OR expires_at > ?2 THEN ?2 ELSE expires_at END
         WHERE id = ?1 AND revoked_at IS NULL",
        params![old, old_expires_at],
    )?;
    if changed != 1 {
        return Err(StoreError::NotFound(format!("key `{old}`")));
    }
    let key = insert_key(&tx, w, new)?;
    tx.commit()?;
    Ok(key)
}

pub(super) fn create_site(
    c: &mut Connection,
    w: &mut WriteCtx,
    institution_id: String,
    name: String,
) -> Result<Site, StoreError> {
    require_institution(c, &institution_id)?;
    let site = Site {
        id: w.id("site"),
        institution_id,
        name,
        created_at: w.now(),
    };
    c.execute(
        "INSERT INTO sites (id, institution_id, name, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![site.id, site.institution_id, site.name, site.created_at],
    )
    .map_err(|e| unique_conflict(e, || format!("site `{}`", site.name)))?;
    Ok(site)
}

pub(super) fn create_group(
    c: &mut Connection,
    w: &mut WriteCtx,
    institution_id: String,
    name: String,
    kind: GroupKind,
    tier_ceiling: Option<Tier>,
) -> Result<Group, StoreError> {
    require_institution(c, &institution_id)?;
    let group = Group {
        id: w.id("group"),
        institution_id,
        name,
        kind,
        tier_ceiling,
        created_at: w.now(),
    };
    c.execute(
        "INSERT INTO member_groups (id, institution_id, name, kind, created_at, tier_ceiling)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            group.id,
            group.institution_id,
            group.name,
            group.kind.as_str(),
            group.created_at,
            group.tier_ceiling.map(Tier::as_str)
        ],
    )
    .map_err(|e| unique_conflict(e, || format!("group `{}`", group.name)))?;
    Ok(group)
}

pub(super) fn create_user(
    c: &mut Connection,
    w: &mut WriteCtx,
    new: NewUser,
) -> Result<AdminUser, StoreError> {
    if let Some(inst) = &new.institution_id {
        require_institution(c, inst)?;
    }
    let user = AdminUser {
        id: w.id("user"),
        username: new.username,
        role: new.role,
        institution_id: new.institution_id,
        created_at: w.now(),
    };
    c.execute(
        "INSERT INTO admin_users (id, username, password_hash, role, institution_id,
            created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            user.id,
            user.username,
            new.password_hash,
            user.role.as_str(),
            user.institution_id,
            user.created_at
        ],
    )
    .map_err(|e| unique_conflict(e, || format!("user `{}`", user.username)))?;
    Ok(user)
}

pub(super) fn delete_user(c: &mut Connection, w: &WriteCtx, id: &str) -> Result<bool, StoreError> {
    let tx = c.savepoint()?;
    tx.execute("DELETE FROM admin_sessions WHERE user_id = ?1", [id])?;
    tx.execute("DELETE FROM login_failures WHERE user_id = ?1", [id])?;
    tx.execute(
        "UPDATE admin_tokens SET revoked_at = ?2
         WHERE created_by = ?1 AND revoked_at IS NULL",
        params![format!("user:{id}"), w.now()],
    )?;
    let n = tx.execute("DELETE FROM admin_users WHERE id = ?1", [id])?;
    tx.commit()?;
    Ok(n == 1)
}

pub(super) fn record_login_failure(
    c: &mut Connection,
    id: &str,
    now: i64,
) -> Result<Option<i64>, StoreError> {
    let tx = c.savepoint()?;
    tx.execute(
        "DELETE FROM login_failures WHERE user_id = ?1 AND at <= ?2",
        params![id, now - LOCKOUT_WINDOW_SECS],
    )?;
    tx.execute(
        "INSERT INTO login_failures (user_id, at) VALUES (?1, ?2)",
        params![id, now],
    )?;
    let recent: i64 = tx.query_row(
        "SELECT COUNT(*) FROM login_failures WHERE user_id = ?1",
        [id],
        |r| r.get(0),
    )?;
    let locked = (recent >= LOCKOUT_FAILURES).then_some(now + LOCKOUT_WINDOW_SECS);
    if let Some(until) = locked {
        tx.execute(
            "UPDATE admin_users SET locked_until = ?2 WHERE id = ?1",
            params![id, until],
        )?;
        tx.execute("DELETE FROM login_failures WHERE user_id = ?1", [id])?;
    }
    tx.commit()?;
    Ok(locked)
}

pub(super) fn clear_login_failures(c: &mut Connection, id: &str) -> Result<(), StoreError> {
    let tx = c.savepoint()?;
    tx.execute("DELETE FROM login_failures WHERE user_id = ?1", [id])?;
    tx.execute(
        "UPDATE admin_users SET locked_until = NULL WHERE id = ?1",
        [id],
    )?;
    tx.commit()?;
    Ok(())
}

pub(super) fn create_session(
    c: &mut Connection,
    token_hash: &[u8; 32],
    user_id: &str,
    expires_at: i64,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO admin_sessions (token_hash, user_id, expires_at) VALUES (?1, ?2, ?3)",
        params![&token_hash[..], user_id, expires_at],
    )?;
    Ok(())
}

pub(super) fn delete_session(c: &mut Connection, token_hash: &[u8; 32]) -> Result<(), StoreError> {
    c.execute(
        "DELETE FROM admin_sessions WHERE token_hash = ?1",
        [&token_hash[..]],
    )?;
    Ok(())
}

pub(super) fn append_audit(
    c: &mut Connection,
    w: &WriteCtx,
    actor: &str,
    action: &str,
    target: &str,
    institution_id: Option<&str>,
) -> Result<i64, StoreError> {
    c.execute(
        "INSERT INTO admin_audit (at, actor, action, target, institution_id)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![w.now(), actor, action, target, institution_id],
    )?;
    Ok(c.last_insert_rowid())
}
