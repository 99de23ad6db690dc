//! Reports by sector and region end to end (issue 8, item 6): patrons served through the real
//! pipeline, counted in the ledger, summed across institutions; a cell of 3 patrons is never
//! shown, and every level still adds up to the whole.

use carrel_tests::Gateway;
use reqwest::Method;
use serde_json::{Value, json};

/// An institution in `sector` and `region` whose service key serves `patrons` distinct patrons
/// (by the OpenAI `user` field), one request each.
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
    let (_, key) = gw
        .create_key(
            inst["id"].as_str().unwrap(),
            json!({"name": "desk", "kind": "service"}),
        )
        .await;
    for p in 0..patrons {
        let resp = gw
            .post(
                "/v1/chat/completions",
                &key,
                &json!({"model": "mock-model", "user": format!("{name}-patron-{p}"),
                        "messages": [{"role": "user", "content": "hello"}]}),
            )
            .await;
        assert_eq!(resp.status(), 200);
    }
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

    let (status, report) = gw
        .admin(Method::GET, "/admin/v1/reports/sectors", None)
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["k"], 10);
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
        .get(gw.admin_url("/admin/v1/reports/sectors?format=csv&k=12"))
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

    // k below 10 is refused; so is anyone but an operator.
    let (status, err) = gw
        .admin(Method::GET, "/admin/v1/reports/sectors?k=3", None)
        .await;
    assert_eq!((status, err["error"]["param"].clone()), (422, json!("k")));
    let inst = gw.institution("Echo").await;
    let admin = gw
        .session("echo-admin", "institution_admin", Some(&inst))
        .await;
    let (status, _) = gw
        .admin_as(&admin, Method::GET, "/admin/v1/reports/sectors", None)
        .await;
    assert_eq!(status, 403);
}
