-- load.lua: a checkpoint's hash and the content packs it needs, in one round trip.
--
-- KEYS[1]        the checkpoint hash
-- KEYS[2 .. ]    the pack keys the caller expects it to name, with their chains (only declared packs are read)
-- ARGV[1]        the key prefix of the flow's packs ('P:pack:{F}:'): a pack key is this prefix and a pack id
-- ARGV[2 .. n]   ids of packs the caller already holds (not sent again)
--
-- Reply: {} when the hash is absent, else {hash fields and values (flat), {pack id, pack string or nil, ...},
-- {pack id, base id, ...}, {key, ...}}: the packs its 'pk' field names and the bases they hold (see _packs.lua) as
-- far as they were declared, then the links to bases that were not and the keys still to declare (both empty when
-- the reply is whole). Read only.

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
local packs = gather(ARGV[1], named, have, {})
return {fields, packs, needed_links, needed_keys}
