-- ZTF by program: candidate.programid 1 (public), 2 (partnership) and 3 (Caltech)
-- to three topics, with the attributes Pitt-Google's subscribers filter on.
-- Anything that is not a ZTF alert goes to the configured topic.
-- Try it: ztfhook check --script scripts/ztf_by_program.lua tests/data/alerts/ztf
local topics = { [1] = "ztf-public", [2] = "ztf-partnership", [3] = "ztf-caltech" }

function route(msg)
  if msg.survey ~= "ztf" then
    return nil
  end
  local a = msg.alert
  local c = a.candidate
  return {
    topic = topics[c.programid] or "@default",
    attributes = {
      objectId = a.objectId,
      candid = a.candid,
      ra = c.ra,
      dec = c.dec,
      schemavsn = a.schemavsn,
      fid = c.fid,
    },
  }
end
