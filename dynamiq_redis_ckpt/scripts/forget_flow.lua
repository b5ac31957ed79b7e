-- forget_flow.lua: remove a flow from its catalog shard, only if its score is still the one the caller read before
-- it found the flow empty (a save registering the flow since has written a newer score: the flow stays).
--
-- KEYS[1] P:catalog:{<n>}   KEYS[2] P:catalog:{<n>}:names
-- ARGV[1] the flow id   ARGV[2] the score read
--
-- Reply: 1 removed | 0 kept (absent, or registered again since)

local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
