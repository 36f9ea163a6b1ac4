-- Routes ZTF alerts by program, from the Kafka topic name alone
-- (ztf_YYYYMMDD_programidN, a new topic every night): public alerts
-- (programid 1) to `ztf-public`, Caltech alerts (programid 3) to
-- `ztf-caltech`; anything else to the configured topic. No decoding.
function route(msg)
  if msg.topic:match("_programid1$") then
    return "ztf-public"
  end
  if msg.topic:match("_programid3$") then
    return "ztf-caltech"
  end
end
