//! Avro in the Confluent wire format (magic byte 0, 4-byte big-endian schema id, Avro binary),
//! with the schema registered in Schema Registry under `<topic>-value` (TopicNameStrategy).

use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SubjectNameStrategy, SuppliedSchema};

use crate::candles::Tick;
use crate::config::SchemaRegistryConfig;

/// The ticker schema, as shipped in schemas/ and registered by avro_schema.sh.
pub const TICKER_SCHEMA: &str = include_str!("../schemas/ticker.avsc");
pub const TICKER_RECORD: &str = "io.candlestream.Ticker";

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("schema registry unavailable: {0}")]
    RegistryUnavailable(String),
    #[error("schema registry refused the request: {0}")]
    RegistryRejected(String),
    #[error("not Confluent wire format ({len} bytes, first byte {first:?}); expected magic byte 0 and a 4-byte schema id")]
    BadMagicByte { len: usize, first: Option<u8> },
    #[error("unknown schema id {id}: {reason}")]
    UnknownSchema { id: u32, reason: String },
    #[error("Avro body does not decode with schema {id}: {reason}")]
    CorruptAvro { id: u32, reason: String },
    #[error("record does not match the ticker record: {0}")]
    NotATicker(String),
    #[error("cannot encode tick: {0}")]
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
            CodecError::NotATicker(_) => "not-a-ticker",
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
        builder.set_basic_authorization(user, cfg.password.as_deref());
    }
    builder.build().map_err(registry_error)
}

pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

/// Encodes ticks, registering the schema under `<topic>-value` on first use and caching the id.
pub struct TickEncoder {
    encoder: AvroEncoder,
    strategy: SubjectNameStrategy,
}

impl TickEncoder {
    pub fn new(cfg: &SchemaRegistryConfig, topic: &str) -> Result<Self, CodecError> {
        let schema = SuppliedSchema::new(Some(TICKER_RECORD.into()), SchemaType::Avro, TICKER_SCHEMA.into());
        Ok(Self {
            encoder: AvroEncoder::new(sr_settings(cfg)?),
            strategy: SubjectNameStrategy::TopicNameStrategyWithSchema(topic.into(), false, schema),
        })
    }

    /// Registers the schema (idempotent on the registry) and returns its id.
    pub async fn register(&self) -> Result<u32, CodecError> {
        let subject = self.strategy.get_subject().map_err(registry_error)?;
        let result = self.encoder.get_schema_and_id(&subject, self.strategy.clone()).await;
        if result.is_err() {
            // Rejections are cached by the converter; a later attempt must ask the registry again.
            self.encoder.remove_errors_from_cache();
        }
        Ok(result.map_err(registry_error)?.id)
    }

    pub async fn encode(&self, tick: &Tick) -> Result<Vec<u8>, CodecError> {
        self.encoder.encode_struct(tick, &self.strategy).await.map_err(|e| {
            if e.retriable { CodecError::RegistryUnavailable(e.to_string()) } else { CodecError::Encode(e.to_string()) }
        })
    }
}

/// Decodes wire-format ticks, fetching writer schemas by id and caching them.
pub struct TickDecoder {
    decoder: AvroDecoder,
}

impl TickDecoder {
    pub fn new(cfg: &SchemaRegistryConfig) -> Result<Self, CodecError> {
        Ok(Self { decoder: AvroDecoder::new(sr_settings(cfg)?) })
    }

    pub async fn decode(&self, payload: &[u8]) -> Result<Tick, CodecError> {
        let id = match payload {
            [0, a, b, c, d, ..] => u32::from_be_bytes([*a, *b, *c, *d]),
            _ => return Err(CodecError::BadMagicByte { len: payload.len(), first: payload.first().copied() }),
        };
        // Looking the schema up on its own tells "unknown id" apart from "corrupt body".
        if let Err(e) = self.decoder.get_schema(id).await {
            return Err(if e.retriable {
                CodecError::RegistryUnavailable(e.to_string())
            } else {
                CodecError::UnknownSchema { id, reason: e.to_string() }
            });
        }
        let value = self
            .decoder
            .decode(Some(payload))
            .await
            .map_err(|e| CodecError::CorruptAvro { id, reason: e.to_string() })?
            .value;
        apache_avro::from_value::<Tick>(&value).map_err(|e| CodecError::NotATicker(e.to_string()))
    }
}
