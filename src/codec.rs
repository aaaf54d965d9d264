//! Avro in the Confluent wire format (magic byte 0, 4-byte big-endian schema id, Avro binary),
//! with the schema registered in Schema Registry under `<topic>-value` (TopicNameStrategy).

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
    encoder: AvroEncoder,
    tick: SubjectNameStrategy,
    trade: SubjectNameStrategy,
}

impl Encoder {
    pub fn new(cfg: &SchemaRegistryConfig, kafka: &KafkaConfig) -> Result<Self, CodecError> {
        let strategy = |kind: RecordKind| {
            let (name, schema) = schema_of(kind);
            let schema = SuppliedSchema::new(Some(name.into()), SchemaType::Avro, schema.into());
            SubjectNameStrategy::TopicNameStrategyWithSchema(
                kafka.topic_of(kind).into(),
                false,
                schema,
            )
        };
        Ok(Self {
            encoder: AvroEncoder::new(sr_settings(cfg)?),
            tick: strategy(RecordKind::Tick),
            trade: strategy(RecordKind::Trade),
        })
    }

    fn strategy(&self, kind: RecordKind) -> &SubjectNameStrategy {
        match kind {
            RecordKind::Tick => &self.tick,
            RecordKind::Trade => &self.trade,
        }
    }

    /// Registers the schema of `kind` (idempotent on the registry) and returns its id.
    pub async fn register(&self, kind: RecordKind) -> Result<u32, CodecError> {
        let strategy = self.strategy(kind);
        let subject = strategy.get_subject().map_err(registry_error)?;
        let result = self
            .encoder
            .get_schema_and_id(&subject, strategy.clone())
            .await;
        if result.is_err() {
            // Rejections are cached by the converter; a later attempt must ask the registry again.
            self.encoder.remove_errors_from_cache();
        }
        Ok(result.map_err(registry_error)?.id)
    }

    pub async fn encode(&self, record: &Record) -> Result<Vec<u8>, CodecError> {
        let strategy = self.strategy(record.kind());
        let encoded = match record {
            Record::Tick(t) => self.encoder.encode_struct(t, strategy).await,
            Record::Trade(t) => self.encoder.encode_struct(t, strategy).await,
        };
        encoded.map_err(|e| {
            if e.retriable {
                CodecError::RegistryUnavailable(e.to_string())
            } else {
                CodecError::Encode(e.to_string())
            }
        })
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
