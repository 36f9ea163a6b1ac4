-- A routing hook of the kind the benchmarks measure: a topic by rule on the
-- Kafka topic name, three attributes, and a deterministic 10% sample (by
-- Kafka offset, so a replay keeps the same messages) of what is not public.
function route(msg)
  local is_public = msg.topic:sub(-11) == "_programid1"
  local sampled = sample(msg.offset, 0.1)
  if not is_public and not sampled then
    return false
  end
  return {
    topic = is_public and "ztf-public" or "ztf-sampled",
    attributes = { survey = "ztf", partition = msg.partition, sampled = sampled },
  }
end
