-- One Kafka connection, every destination, for a stream that carries both
-- surveys: each alert goes to its survey's raw topic and BigQuery JSON topic
-- ([bigquery] topics) and is archived in Cloud Storage. ZTF alerts use the
-- config's `@archive` ({kafka.topic}/{objectId}/{candid}.avro); Rubin alerts
-- are named by their diaObjectId and diaSourceId in the same bucket.
-- Anything that is neither survey goes to the configured topic alone.
local BUCKET = "my-alert-archive"

function route(msg)
  if msg.survey == "ztf" then
    return { topics = { "ztf-alerts", "ztf-alerts-bigquery" }, objects = { "@archive" } }
  elseif msg.survey == "lsst" then
    local s = msg.alert.diaSource
    -- A solar-system source has no diaObjectId (null or 0): 0.
    local object = s.diaObjectId or 0
    local name = string.format("gs://%s/%s/%d/%d.avro", BUCKET, msg.topic, object, s.diaSourceId)
    return { topics = { "lsst-alerts", "lsst-alerts-bigquery" }, objects = { name } }
  end
  return true
end
