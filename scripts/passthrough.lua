-- The default hook: every message goes to the configured Pub/Sub topic
-- (pubsub.topic), its bytes untouched, with the core's attributes only.
-- Returning nothing means exactly that; the output is identical, byte for
-- byte and attribute for attribute, to ztfhook's built-in pass-through.
function route(msg)
end
