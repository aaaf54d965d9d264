//! Avro in the Confluent wire format (magic byte 0, 4-byte big-endian schema id, Avro binary),
//! with the schema registered in Schema Registry under `<topic>-value` (TopicNameStrategy).

use std::sync::{LazyLock, OnceLock};

use apache_avro::Schema;
use apache_avro::writer::datum::GenericDatumWriter;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};

use serde::de::DeserializeOwned;

use crate::config::{KafkaConfig, SchemaRegistryConfig, Secret};
use crate::model::{Record, RecordKind, Tick, Trade};

/// The ticker schema, as shipped in schemas/ and registered by avro_schema.sh.
pub const TICKER_SCHEMA: &str = include_str!("../schemas/ticker.avsc");
pub const TICKER_RECORD: &str = "io.candlestream.Ticker";
/// The trade schema, as shipped in schemas/ and registered by avro_schema.sh.
pub const TRADE_SCHEMA: &str = include_str!("../schemas/trade.avsc");
pub const TRADE_RECORD: &str = "io.candlestream.Trade";

/// The writer schema of each record type, and the full name that tells them apart on decode.
fn schema_of(kind: RecordKind) -> (&'static str, &'static str) {
    match kind {
        RecordKind::Tick => (TICKER_RECORD, TICKER_SCHEMA),
        RecordKind::Trade => (TRADE_RECORD, TRADE_SCHEMA),
    }
}
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("schema registry unavailable: {0}")]
    RegistryUnavailable(String),
    #[error("schema registry refused the request: {0}")]
    RegistryRejected(String),
    #[error(
        "not Confluent wire format ({len} bytes, first byte {first:?}); expected magic byte 0 and a 4-byte schema id"
    )]
    BadMagicByte { len: usize, first: Option<u8> },
    #[error("unknown schema id {id}: {reason}")]
    UnknownSchema { id: u32, reason: String },
    #[error("Avro body does not decode with schema {id}: {reason}")]
    CorruptAvro { id: u32, reason: String },
    #[error("record does not match its {record} schema: {reason}")]
    Mismatch { record: String, reason: String },
    #[error("schema {id} is {name:?}, which is no record type of ours")]
    UnknownRecord { id: u32, name: Option<String> },
    #[error("cannot encode record: {0}")]
    Encode(String),
}

impl CodecError {
    /// Retryable errors clear up by themselves (the registry comes back); the others are
    /// properties of the bytes and will fail the same way forever.
    pub fn is_retryable(&self) -> bool {
        matches!(self, CodecError::RegistryUnavailable(_))
    }

    /// A short, stable label for DLQ headers and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            CodecError::RegistryUnavailable(_) => "registry-unavailable",
            CodecError::RegistryRejected(_) => "registry-rejected",
            CodecError::BadMagicByte { .. } => "bad-magic-byte",
            CodecError::UnknownSchema { .. } => "unknown-schema-id",
            CodecError::CorruptAvro { .. } => "corrupt-avro",
            CodecError::Mismatch { .. } => "schema-mismatch",
            CodecError::UnknownRecord { .. } => "unknown-record",
            CodecError::Encode(_) => "encode-failed",
        }
    }
}

fn registry_error(e: SRCError) -> CodecError {
    if e.retriable {
        CodecError::RegistryUnavailable(e.to_string())
    } else {
        CodecError::RegistryRejected(e.to_string())
    }
}

pub fn sr_settings(cfg: &SchemaRegistryConfig) -> Result<SrSettings, CodecError> {
    let mut builder = SrSettings::new_builder(cfg.url.clone());
    builder.set_timeout(cfg.timeout);
    if let Some(user) = &cfg.username {
        builder.set_basic_authorization(user, cfg.password.as_ref().map(Secret::expose));
    }
    builder.build().map_err(registry_error)
}

pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

/// Encodes every record type, registering each schema under `<its topic>-value` on first use
/// and caching the ids.
pub struct Encoder {
    registry: AvroEncoder,
    tick: Writer,
    trade: Writer,
}

/// One record type's schema: how it is registered, its id once registered, and its writer.
struct Writer {
    strategy: SubjectNameStrategy,
    id: OnceLock<u32>,
    avro: GenericDatumWriter<'static>,
}

/// The writer schema of `kind`, parsed once. Why the encoder writes with it itself rather than
/// through the converter's `encode_struct`: per record, that clones the schema text and the
/// resolved names and copies the body once more behind the header, several times the cost of
/// the Avro encoding itself.
fn parsed_schema(kind: RecordKind) -> &'static Schema {
    static TICKER: LazyLock<Schema> =
        LazyLock::new(|| Schema::parse_str(TICKER_SCHEMA).expect("shipped schema parses"));
    static TRADE: LazyLock<Schema> =
        LazyLock::new(|| Schema::parse_str(TRADE_SCHEMA).expect("shipped schema parses"));
    match kind {
        RecordKind::Tick => &TICKER,
        RecordKind::Trade => &TRADE,
    }
}

/// Room for a whole record in one allocation: tickers take about 110 bytes, trades about 50.
const PAYLOAD_CAPACITY: usize = 128;

impl Encoder {
    pub fn new(cfg: &SchemaRegistryConfig, kafka: &KafkaConfig) -> Result<Self, CodecError> {
        let writer = |kind: RecordKind| {
            let (name, schema) = schema_of(kind);
            let supplied = SuppliedSchema::new(Some(name.into()), SchemaType::Avro, schema.into());
            Writer {
                strategy: SubjectNameStrategy::TopicNameStrategyWithSchema(
                    kafka.topic_of(kind).into(),
                    false,
                    supplied,
                ),
                id: OnceLock::new(),
                avro: GenericDatumWriter::builder(parsed_schema(kind))
                    .build()
                    .expect("shipped schema resolves"),
            }
        };
        Ok(Self {
            registry: AvroEncoder::new(sr_settings(cfg)?),
            tick: writer(RecordKind::Tick),
            trade: writer(RecordKind::Trade),
        })
    }

    fn writer(&self, kind: RecordKind) -> &Writer {
        match kind {
            RecordKind::Tick => &self.tick,
            RecordKind::Trade => &self.trade,
        }
    }

    /// Registers the schema of `kind` (idempotent on the registry) and returns its id.
    pub async fn register(&self, kind: RecordKind) -> Result<u32, CodecError> {
        let writer = self.writer(kind);
        if let Some(id) = writer.id.get() {
            return Ok(*id);
        }
        let subject = writer.strategy.get_subject().map_err(registry_error)?;
        let result = self
            .registry
            .get_schema_and_id(&subject, writer.strategy.clone())
            .await;
        if result.is_err() {
            // Rejections are cached by the converter; a later attempt must ask the registry again.
            self.registry.remove_errors_from_cache();
        }
        let id = result.map_err(registry_error)?.id;
        Ok(*writer.id.get_or_init(|| id))
    }

    /// The Confluent wire format of `record`: magic byte 0, the schema id, the Avro body.
    /// Registers the schema first if it is not yet.
    pub async fn encode(&self, record: &Record) -> Result<Vec<u8>, CodecError> {
        let kind = record.kind();
        let id = self.register(kind).await?;
        let mut payload = Vec::with_capacity(PAYLOAD_CAPACITY);
        payload.push(0);
        payload.extend_from_slice(&id.to_be_bytes());
        let avro = &self.writer(kind).avro;
        let written = match record {
            Record::Tick(t) => avro.write_ser(&mut payload, t),
            Record::Trade(t) => avro.write_ser(&mut payload, t),
        };
        written.map_err(|e| CodecError::Encode(e.to_string()))?;
        Ok(payload)
    }
}

/// Decodes wire-format records of every type, fetching writer schemas by id and caching them.
/// The writer schema's full name says which record type the bytes hold.
pub struct Decoder {
    decoder: AvroDecoder,
    /// Asks the registry directly after a failed lookup: the converter retries only 502 and 503
    /// and caches every other failure, but only a definite "no such schema" may condemn a record.
    probe: reqwest::Client,
    cfg: SchemaRegistryConfig,
}

/// Schema Registry's error code for an id it does not know.
const SCHEMA_NOT_FOUND: i64 = 40403;

impl Decoder {
    pub fn new(cfg: &SchemaRegistryConfig) -> Result<Self, CodecError> {
        let probe = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .build()
            .map_err(|e| CodecError::RegistryRejected(e.to_string()))?;
        Ok(Self {
            decoder: AvroDecoder::new(sr_settings(cfg)?),
            probe,
            cfg: cfg.clone(),
        })
    }

    /// After the converter failed to fetch schema `id`: Ok when it has it after all, an unknown
    /// schema when the registry says so (or the schema it has is unusable), and otherwise a
    /// passing fault (5xx, timeout, refused connection, a proxy's 404 page, bad credentials).
    async fn lookup_failed(&self, id: u32, failure: SRCError) -> Result<(), CodecError> {
        // The converter keeps definite failures forever; the next attempt must ask again.
        self.decoder.remove_errors_from_cache();
        if failure.retriable {
            return Err(CodecError::RegistryUnavailable(failure.to_string()));
        }
        let mut request = self.probe.get(format!(
            "{}/schemas/ids/{id}",
            self.cfg.url.trim_end_matches('/')
        ));
        if let Some(user) = &self.cfg.username {
            request = request.basic_auth(user, self.cfg.password.as_ref().map(Secret::expose));
        }
        let unavailable = |answer: String| {
            CodecError::RegistryUnavailable(format!(
                "schema {id}: {failure}; registry answered {answer}"
            ))
        };
        let answer = match request.send().await {
            Ok(answer) => answer,
            Err(e) => return Err(unavailable(e.to_string())),
        };
        let status = answer.status();
        if status.is_success() {
            // Served now: either the failure has passed, or the schema itself is unusable.
            return match self.decoder.get_schema(id).await {
                Ok(_) => Ok(()),
                Err(e) if e.retriable => Err(CodecError::RegistryUnavailable(e.to_string())),
                Err(e) => {
                    self.decoder.remove_errors_from_cache();
                    Err(CodecError::UnknownSchema {
                        id,
                        reason: e.to_string(),
                    })
                }
            };
        }
        let body: serde_json::Value = answer.json().await.unwrap_or_default();
        if status == reqwest::StatusCode::NOT_FOUND
            && body["error_code"].as_i64() == Some(SCHEMA_NOT_FOUND)
        {
            return Err(CodecError::UnknownSchema {
                id,
                reason: body["message"].as_str().unwrap_or("not found").into(),
            });
        }
        Err(unavailable(format!("HTTP {status} {body}")))
    }

    pub async fn decode(&self, payload: &[u8]) -> Result<Record, CodecError> {
        let id = match payload {
            [0, a, b, c, d, ..] => u32::from_be_bytes([*a, *b, *c, *d]),
            _ => {
                return Err(CodecError::BadMagicByte {
                    len: payload.len(),
                    first: payload.first().copied(),
                });
            }
        };
        // Looking the schema up on its own tells "unknown id" apart from "corrupt body".
        if let Err(e) = self.decoder.get_schema(id).await {
            self.lookup_failed(id, e).await?;
        }
        let decoded =
            self.decoder
                .decode(Some(payload))
                .await
                .map_err(|e| CodecError::CorruptAvro {
                    id,
                    reason: e.to_string(),
                })?;
        let name = decoded.name.map(|n| n.fullname(None));
        match name.as_deref() {
            Some(TICKER_RECORD) => {
                from_value::<Tick>(&decoded.value, TICKER_RECORD).map(Record::Tick)
            }
            Some(TRADE_RECORD) => {
                from_value::<Trade>(&decoded.value, TRADE_RECORD).map(Record::Trade)
            }
            _ => Err(CodecError::UnknownRecord { id, name }),
        }
    }
}

fn from_value<T: DeserializeOwned>(
    value: &apache_avro::types::Value,
    record: &str,
) -> Result<T, CodecError> {
    apache_avro::from_value::<T>(value).map_err(|e| CodecError::Mismatch {
        record: record.into(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Source, Tick, Trade};

    /// The encoder's own Avro writing must give the bytes apache_avro's generic path gives.
    #[tokio::test]
    async fn encodes_what_apache_avro_encodes_behind_the_wire_header() {
        let cfg = SchemaRegistryConfig {
            // Never asked: the ids are known.
            url: "http://127.0.0.1:9".into(),
            ..Default::default()
        };
        let encoder = Encoder::new(&cfg, &KafkaConfig::default()).unwrap();
        encoder.tick.id.set(7).unwrap();
        encoder.trade.id.set(0x0102_0304).unwrap();
        let tick = Tick {
            symbol: "tBTCUSD".into(),
            bid: 97321.0,
            bid_size: 5.22112483,
            ask: 97322.0,
            ask_size: 4.31554012,
            daily_change: -1200.0,
            daily_change_relative: -0.0122,
            last_price: 97321.0,
            volume: 1210.55304011,
            high: 99000.0,
            low: 96100.0,
            exchange_time: 1_763_787_600_123,
            sequence: Some(42),
            source: Source::Websocket,
            received_at: 1_763_787_600_200,
        };
        let trade = Trade {
            symbol: "tETHUSD".into(),
            id: 1_733_111_222,
            exchange_time: 1_763_787_600_124,
            amount: -0.25,
            price: 3150.5,
            source: Source::Rest,
            sequence: None,
            received_at: 1_763_787_600_300,
        };
        #[allow(deprecated)] // The reference path, on purpose.
        let reference = |kind: RecordKind, value: apache_avro::types::Value| {
            apache_avro::to_avro_datum(parsed_schema(kind), value).unwrap()
        };
        let cases = [
            (
                Record::Tick(tick.clone()),
                vec![0, 0, 0, 0, 7],
                reference(RecordKind::Tick, apache_avro::to_value(&tick).unwrap()),
            ),
            (
                Record::Trade(trade.clone()),
                vec![0, 1, 2, 3, 4],
                reference(RecordKind::Trade, apache_avro::to_value(&trade).unwrap()),
            ),
        ];
        for (record, header, body) in cases {
            let payload = encoder.encode(&record).await.unwrap();
            assert_eq!(payload[..5], header[..], "{record:?}");
            assert_eq!(payload[5..], body[..], "{record:?}");
        }
    }
}
