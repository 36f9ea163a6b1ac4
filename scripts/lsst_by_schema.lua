-- Rubin by schema version, from the 5-byte wire header alone (nothing is
-- decoded): schema id 900 is v9.0, and each major version goes to its own
-- topic (lsst-alerts-v9, lsst-alerts-v10, ...), so a subscriber sees one schema.
function route(msg)
  local id = msg.schema_id
  if id == nil then
    return nil
  end
  return {
    topic = "lsst-alerts-v" .. (id // 100),
    attributes = { schema_version = msg.schema_version },
  }
end
