//! Reports by sector and region end to end (issue 8, item 6): patrons' usage in the ledger,
//! summed across institutions for a month that is over; a cell of 3 patrons is never shown,
//! and every level still adds up to the whole.

use carrel_core::store::UsageRecord;
use carrel_tests::Gateway;
use reqwest::Method;
use serde_json::{Value, json};

/// The month before last (`YYYY-MM`): over everywhere, whatever today is.
fn past_month() -> String {
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    let first = today.first_of_month() - jiff::Span::new().months(2);
    first.to_string()[..7].to_owned()
}

/// An institution in `sector` and `region` whose service key served `patrons` distinct
/// patrons, one request each, on a day of `month`: usage records written to the ledger as the
/// gateway's writer writes them (a report covers only months that are over, which requests made
/// now cannot reach).
async fn served(gw: &Gateway, name: &str, sector: &str, region: &str, patrons: usize) {
    let (status, inst) = gw
        .admin(
            Method::POST,
            "/admin/v1/institutions",
            Some(json!({"name": name, "kind": "library", "region": region,
                        "timezone": "UTC", "sector": sector})),
        )
        .await;
    assert_eq!(status, 201, "{inst}");
    let inst = inst["id"].as_str().unwrap().to_owned();
    let (key_id, _) = gw
        .create_key(&inst, json!({"name": "desk", "kind": "service"}))
        .await;
    let day = format!("{}-10", past_month());
    let at = format!("{day}T12:00:00Z")
        .parse::<jiff::Timestamp>()
        .unwrap()
        .as_second();
    let (p, c) = carrel_tests::mock::MOCK_USAGE;
    let records = (0..patrons)
        .map(|i| UsageRecord {
            request_id: format!("req_{name}_{i}"),
            at,
            day: day.clone(),
            institution_id: inst.as_str().into(),
            key_id: key_id.as_str().into(),
            patron_ref: Some(format!("{name}-patron-{i}").into()),
            model: "mock-model".into(),
            prompt_tokens: p,
            completion_tokens: c,
            cost_nano_usd: (p * 150 + c * 600) as i64,
            ..UsageRecord::default()
        })
        .collect();
    gw.app.state.store.record_usage(records).await.unwrap();
}

fn sum(rows: &[Value], field: &str) -> u64 {
    rows.iter().map(|r| r[field].as_u64().unwrap()).sum()
}

#[tokio::test]
async fn a_cell_of_three_patrons_is_suppressed_and_the_levels_add_up() {
    let (_mock, gw) = Gateway::with_mock().await;
    served(&gw, "Alpha", "public_library", "US-IL", 12).await;
    served(&gw, "Bravo", "public_library", "US-MN", 10).await;
    served(&gw, "Charlie", "public_library", "US-WI", 3).await;
    served(&gw, "Delta", "k12", "US-IL", 11).await;

    let month = past_month();
    let (status, report) = gw
        .admin(
            Method::GET,
            &format!("/admin/v1/reports/sectors?month={month}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["k"], 10);
    assert_eq!(report["from"], format!("{month}-01"));
    let total = &report["total"];
    assert_eq!(total["requests"], 36, "{report}");
    assert_eq!(total["subjects"], 36, "{report}");
    assert_eq!(total["institutions"], 4);

    // The 3-patron cell (US-WI) is nowhere by name: it is pooled with the next smallest
    // region of its sector (US-MN, 10), so neither can be recovered by subtraction.
    let text = report.to_string();
    assert!(
        !text.contains("US-WI") && !text.contains("US-MN"),
        "{report}"
    );
    let sectors = report["sectors"].as_array().unwrap();
    let library = sectors
        .iter()
        .find(|s| s["sector"] == "public_library")
        .unwrap();
    let regions = library["regions"].as_array().unwrap();
    let shown: Vec<(Value, Value)> = regions
        .iter()
        .map(|r| (r["region"].clone(), r["subjects"].clone()))
        .collect();
    assert_eq!(
        shown,
        [(json!("US-IL"), json!(12)), (Value::Null, json!(13))]
    );
    assert_eq!(regions[1]["cells"], 2);

    // Every shown row stands for at least k, and each level adds up to its parent.
    for field in ["requests", "prompt_tokens", "completion_tokens", "subjects"] {
        assert_eq!(
            sum(sectors, field),
            total[field].as_u64().unwrap(),
            "{field}"
        );
        for s in sectors {
            let regions = s["regions"].as_array().unwrap();
            assert_eq!(sum(regions, field), s[field].as_u64().unwrap(), "{field}");
        }
    }
    for s in sectors {
        assert!(s["subjects"].as_u64().unwrap() >= 10, "{s}");
        for r in s["regions"].as_array().unwrap() {
            assert!(r["subjects"].as_u64().unwrap() >= 10, "{r}");
        }
    }
    let cost: f64 = sectors
        .iter()
        .map(|s| s["cost_usd"].as_f64().unwrap())
        .sum();
    assert!((cost - total["cost_usd"].as_f64().unwrap()).abs() < 1e-12);

    // The CSV says the same, and names no small cell either.
    let resp = gw
        .http
        .get(gw.admin_url(&format!(
            "/admin/v1/reports/sectors?format=csv&k=12&month={month}"
        )))
        .bearer_auth(carrel_tests::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let csv = resp.text().await.unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "level,sector,region,cells,institutions,subjects,requests,prompt_tokens,\
         completion_tokens,total_tokens,cost_usd,cached,savings_usd"
    );
    assert!(lines[1].starts_with("total,,,4,4,36,36,"), "{csv}");
    // At k = 12 the k12 sector (11) is pooled, and takes the only other sector with it: one
    // pooled row, equal to the total.
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(
        lines[2].starts_with("sector,,,4,4,36,36,252,180,432,"),
        "{csv}"
    );
    assert_eq!(
        lines[1]["total".len()..],
        lines[2]["sector".len()..],
        "{csv}"
    );

    // k below 10 is refused; so is a month that is not over, and anyone but an operator.
    let (status, err) = gw
        .admin(Method::GET, "/admin/v1/reports/sectors?k=3", None)
        .await;
    assert_eq!((status, err["error"]["param"].clone()), (422, json!("k")));
    let this_month = &jiff::Timestamp::now().to_string()[..7];
    let (status, err) = gw
        .admin(
            Method::GET,
            &format!("/admin/v1/reports/sectors?month={this_month}"),
            None,
        )
        .await;
    assert_eq!(
        (status, err["error"]["param"].clone()),
        (422, json!("month"))
    );
    let inst = gw.institution("Echo").await;
    let admin = gw
        .session("echo-admin", "institution_admin", Some(&inst))
        .await;
    let (status, _) = gw
        .admin_as(&admin, Method::GET, "/admin/v1/reports/sectors", None)
        .await;
    assert_eq!(status, 403);
}
