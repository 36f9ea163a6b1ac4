-- Rubin: solar-system sources (a non-zero diaSource.ssObjectId) to one topic,
-- static-sky sources to another, with the identifiers, position and band as
-- attributes (ssObjectId for the first, diaObjectId for the second).
function route(msg)
  if msg.survey ~= "lsst" then
    return nil
  end
  local s = msg.alert.diaSource
  local attrs = { diaSourceId = s.diaSourceId, ra = s.ra, dec = s.dec, band = s.band }
  local ss = s.ssObjectId or 0
  if ss ~= 0 then
    attrs.ssObjectId = ss
    return { topic = "lsst-solar-system", attributes = attrs }
  end
  attrs.diaObjectId = s.diaObjectId
  return { topic = "lsst-static", attributes = attrs }
end
