//! Grafana's InfluxDB credential may read and nothing else. InfluxDB 2.x's v1 authorization that
//! launch.sh creates (`influx v1 auth create --read-bucket`) is the same model as a 1.x user with
//! READ on the database, which a real InfluxDB 1.6.7 enforces here: the InfluxQL a dashboard
//! viewer can send through Grafana's `/api/ds/query` cannot drop, delete or write.

mod support;

use support::influx1::Influx1;

const DB: &str = "crypto";

/// One InfluxQL statement as the `grafana` user, the way Grafana's proxy sends it: GET /query
/// with the credential. Returns (HTTP status, body).
async fn as_grafana(influx: &Influx1, q: &str) -> (u16, String) {
    let resp = reqwest::Client::new()
        .get(format!("{}/query", influx.url()))
        .query(&[("db", DB), ("q", q)])
        .basic_auth("grafana", Some("grafana-reader-pw"))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafanas_credential_reads_but_cannot_drop_delete_or_write() {
    let influx = Influx1::start_with_auth().await;
    influx.create_database(DB).await;
    let write = reqwest::Client::new()
        .post(format!("{}/write", influx.url()))
        .query(&[("db", DB), ("precision", "ms")])
        .basic_auth("admin", Some("admin-pw"))
        .body("trades,symbol=tBTCUSD,side=buy id=1i,price=100,amount=0.5 1700000000000")
        .send()
        .await
        .unwrap();
    assert!(write.status().is_success());
    influx
        .query(
            DB,
            "CREATE USER grafana WITH PASSWORD 'grafana-reader-pw'; GRANT READ ON \"crypto\" TO grafana",
        )
        .await;

    let count = "SELECT count(\"price\") FROM \"trades\"";
    let (status, body) = as_grafana(&influx, count).await;
    assert_eq!(status, 200, "{body}");
    let read: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        read["results"][0]["series"][0]["values"][0][1], 1,
        "Grafana reads the trade: {body}"
    );

    for statement in [
        "DROP MEASUREMENT \"trades\"",
        "DELETE FROM \"trades\" WHERE \"symbol\" = 'tBTCUSD'",
        "DROP SERIES FROM \"trades\"",
        "DROP DATABASE \"crypto\"",
        "CREATE USER intruder WITH PASSWORD 'x' WITH ALL PRIVILEGES",
        // A second statement smuggled behind a read.
        "SELECT * FROM \"trades\"; DROP MEASUREMENT \"trades\"",
    ] {
        let (status, body) = as_grafana(&influx, statement).await;
        let refused = status == 403 || body.contains("error");
        assert!(refused, "{statement}: {status} {body}");
    }
    let refused_write = reqwest::Client::new()
        .post(format!("{}/write", influx.url()))
        .query(&[("db", DB), ("precision", "ms")])
        .basic_auth("grafana", Some("grafana-reader-pw"))
        .body("trades,symbol=tBTCUSD,side=sell id=2i,price=1,amount=1 1700000001000")
        .send()
        .await
        .unwrap();
    assert_eq!(refused_write.status().as_u16(), 403);

    // Nothing changed: the one trade is still there, and still alone.
    let rows = influx.rows(DB, count).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["count"], 1);
    let users = influx.query("", "SHOW USERS").await.to_string();
    assert!(!users.contains("intruder"), "{users}");
}
