-- ZTF quality cut: keep every alert with rb >= 0.55 and nbad == 0, and a
-- deterministic 10% of the low-quality rest (by candid, so a replay keeps the
-- same ones). Each kept alert gets is_pure, the common purity cut:
-- rb >= 0.65, nbad == 0, fwhm <= 5, elong <= 1.2, |magdiff| <= 0.1.
-- A missing (nil) score counts as failing the cut.
function route(msg)
  if msg.survey ~= "ztf" then
    return nil
  end
  local a = msg.alert
  local c = a.candidate
  local rb = c.rb or 0.0
  local nbad = c.nbad or 1
  local low = rb < 0.55 or nbad > 0
  if low and not sample(a.candid, 0.1) then
    return false
  end
  local pure = rb >= 0.65 and nbad == 0 and (c.fwhm or 99.0) <= 5.0
    and (c.elong or 99.0) <= 1.2 and math.abs(c.magdiff or 99.0) <= 0.1
  return { attributes = { is_pure = pure, low_quality = low } }
end
