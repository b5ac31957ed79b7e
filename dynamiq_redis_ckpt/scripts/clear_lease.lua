-- clear_lease.lua: clear() deletes a run's lease unless a run holds it right now: a live run is never disturbed
-- by a plain API call (it renews and writes on as before; only its checkpoints are gone).
--
-- KEYS[1] P:lease:{F}:<run> (a key of another type is deleted too: clear() empties the namespace)
--
-- Reply: 1 deleted | 0 nothing there | {flow} kept (live): clear() announces that flow to workers again

if redis.call('TYPE', KEYS[1])['ok'] == 'hash' then
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local l = redis.call('HMGET', KEYS[1], 'owner', 'exp', 'flow')
  if l[1] and l[1] ~= '' and (tonumber(l[2]) or 0) > now_ms then
    return {l[3] or ''}
  end
end
return redis.call('UNLINK', KEYS[1])
