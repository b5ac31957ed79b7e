-- load.lua: a checkpoint's hash and the content packs it needs, in one round trip.
--
-- KEYS[1]        the checkpoint hash
-- ARGV[1]        the key prefix of the flow's packs ('P:pack:{F}:'): a pack key is this prefix and a pack id
-- ARGV[2 .. n]   ids of packs the caller already holds (not sent again)
--
-- Reply: {} when the hash is absent, else {hash fields and values (flat), {pack id, pack string or nil, ...}}:
-- the packs its 'pk' field names and the bases they hold (see _packs.lua). Read only.

local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then
  return {}
end
local named = {}
for i = 1, #fields, 2 do
  if fields[i] == 'pk' then
    for id in string.gmatch(fields[i + 1], '[^,]+') do
      named[#named + 1] = id
    end
  end
end
local have = {}
for i = 2, #ARGV do
  have[ARGV[i]] = true
end
return {fields, gather(ARGV[1], named, have, {})}
