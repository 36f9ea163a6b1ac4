-- A fast lane for bright alerts: ZTF alerts brighter than magnitude 18
-- (candidate.magpsf < 18) and Rubin alerts with diaSource.snr > 50 go to
-- alerts-bright as well as to the configured topic ("@default").
function route(msg)
  local bright = false
  if msg.survey == "ztf" then
    bright = (msg.alert.candidate.magpsf or 99.0) < 18.0
  elseif msg.survey == "lsst" then
    bright = (msg.alert.diaSource.snr or 0.0) > 50.0
  end
  if bright then
    return { "@default", "alerts-bright" }
  end
  return nil
end
