-- load.lua: a checkpoint's hash and the content packs it references, in one round trip.
--
-- KEYS[1]        the checkpoint hash
-- ARGV[1]        the key prefix of the flow's packs ('P:pack:{F}:'): a pack key is this prefix and a pack id
-- ARGV[2 .. n]   ids of packs the caller already holds (not sent again)
--
-- Reply: {} when the hash is absent, else {hash fields and values (flat), {pack id, pack string or nil, ...}}
--
-- The pack keys are read from the hash's 'pk' field, so they cannot be declared in KEYS: they are built from the
-- hash's own flow tag, so they live in its slot (and a Redis Cluster node serves them with it). Read only.

local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then
  return {}
end
local pk = ''
for i = 1, #fields, 2 do
  if fields[i] == 'pk' then
    pk = fields[i + 1]
  end
end
local have = {}
for i = 2, #ARGV do
  have[ARGV[i]] = true
end
local packs = {}
for id in string.gmatch(pk, '[^,]+') do
  if not have[id] then
    packs[#packs + 1] = id
    packs[#packs + 1] = redis.call('GET', ARGV[1] .. id)
  end
end
return {fields, packs}
