-- Request mirroring for the shadow step (HAProxy 2.6 has no `http-request mirror`).
--
-- `http-request lua.mlrollout_mirror <backend> <server>` copies the request (method POST, path, body,
-- content-type and x-request-id, so both answers carry the same id) to that server's current address
-- from a separate task and drops its answer. The action itself only queues: the user's request goes on
-- to its own server at once, so a slow, failing or dead canary can neither delay nor fail it.
--
-- Bounded: at most MAX_INFLIGHT copies in flight; a copy beyond that is dropped and counted, never
-- queued. A body HAProxy did not buffer whole (larger than tune.bufsize) is skipped, never sent cut.
-- `http-request use-service lua.mlrollout_mirror_metrics` serves the counters as Prometheus text.
--
-- Label agreement: each mirrored request gets a pair key (txn.mlr_pair). `http-response
-- lua.mlrollout_pair` (after `wait-for-body`) reads the predicted labels of the user's answer, the
-- mirror task those of the canary's answer to the same request; whichever comes second compares them
-- row by row and counts agreeing and disagreeing rows per model, canary and stable version. A pair
-- without two readable answers of the same length is counted unpaired, never compared; pairs wait at
-- most PAIR_TTL_S, and at most MAX_PENDING wait at once.

local MAX_INFLIGHT = 64
local TIMEOUT_MS = 5000
local MAX_PENDING = 4096
local PAIR_TTL_S = 30

local inflight = 0
local counts = { ok = 0, error = 0, dropped = 0, skipped = 0 }
local seq, npending, pending = 0, 0, {}
local pair_counts = { paired = 0, unpaired = 0 }
local agreement = {} -- "model\tcanary version\tstable version" -> { agree = n, disagree = n }

-- The V2 JSON answer's "label" output: {"name": "label", "datatype": .., "shape": [..], "data": [..]}
-- (serving/runtime/core.py v2_response). nil for anything else (binary outputs, no label output).
local function labels_of(body)
  if not body then
    return nil
  end
  local at = body:find('"name"%s*:%s*"label"')
  if not at then
    return nil
  end
  local from, _, data = body:find('"data"%s*:%s*%[([^%]]*)%]', at)
  local next_name = body:find('"name"%s*:', at + 1)
  if not from or (next_name and next_name < from) then
    return nil
  end
  local out = {}
  for v in data:gmatch("[^,%s]+") do
    out[#out + 1] = v
  end
  return out
end

local function header(headers, name)
  local h = headers and headers[name]
  return h and (h[0] or h[1]) or nil
end

local function settle(key)
  local p = pending[key]
  if p == nil or p.stable == nil or p.canary == nil then
    return
  end
  pending[key] = nil
  npending = npending - 1
  if not p.stable or not p.canary or #p.stable ~= #p.canary or #p.stable == 0 then
    pair_counts.unpaired = pair_counts.unpaired + 1
    return
  end
  local k = table.concat({ p.model or "", p.cv or "", p.sv or "" }, "\t")
  local a = agreement[k] or { agree = 0, disagree = 0 }
  agreement[k] = a
  for i = 1, #p.stable do
    if p.stable[i] == p.canary[i] then
      a.agree = a.agree + 1
    else
      a.disagree = a.disagree + 1
    end
  end
  pair_counts.paired = pair_counts.paired + 1
end

local function send(url, headers, body, key)
  local ok, res = pcall(function()
    local hc = core.httpclient()
    return hc:post({ url = url, headers = headers, body = body, timeout = TIMEOUT_MS })
  end)
  -- the canary's own errors are in its metrics; here "error" is any copy without a 2xx answer
  local good = ok and res and res.status and res.status >= 200 and res.status < 300
  if good then
    counts.ok = counts.ok + 1
  else
    counts.error = counts.error + 1
  end
  inflight = inflight - 1
  local p = key and pending[key]
  if p then
    p.canary = good and labels_of(res.body) or false
    p.cv = good and header(res.headers, "x-model-version") or nil
    settle(key)
  end
end

core.register_action("mlrollout_pair", { "http-res" }, function(txn)
  local key = txn:get_var("txn.mlr_pair")
  key = key and tostring(key)
  local p = key and pending[key]
  if not p then
    return
  end
  local status = tonumber(txn.sf:status()) or 0
  local hdrs = txn.http:res_get_headers()
  p.stable = status >= 200 and status < 300 and labels_of(txn.sf:res_body()) or false
  p.sv, p.model = header(hdrs, "x-model-version"), header(hdrs, "x-model-name")
  settle(key)
end)

-- pairs whose second answer never comes (a client gone, a canary that timed out unanswered)
core.register_task(function()
  while true do
    core.msleep(1000)
    local now = core.now().sec
    for k, p in pairs(pending) do
      if now - p.t > PAIR_TTL_S then
        pending[k] = nil
        npending = npending - 1
        pair_counts.unpaired = pair_counts.unpaired + 1
      end
    end
  end
end)

core.register_action("mlrollout_mirror", { "http-req" }, function(txn, backend, server)
  if inflight >= MAX_INFLIGHT then
    counts.dropped = counts.dropped + 1
    return
  end
  local be = core.backends[backend]
  local sv = be and be.servers[server]
  if not sv then
    counts.error = counts.error + 1
    return
  end
  local body = txn.sf:req_body() or ""
  local hdrs = txn.http:req_get_headers()
  local declared = hdrs["content-length"] and tonumber(hdrs["content-length"][0])
  if declared and declared ~= #body then
    counts.skipped = counts.skipped + 1
    return
  end
  local copy = { ["content-length"] = { tostring(#body) } }
  for _, name in ipairs({ "content-type", "x-request-id" }) do
    if hdrs[name] then
      copy[name] = { hdrs[name][0] }
    end
  end
  local url = "http://" .. sv:get_addr() .. txn.sf:path()
  local key = nil
  if npending < MAX_PENDING then
    seq = seq + 1
    key = tostring(seq) -- the txn variable comes back as a string or a number: key by the string
    pending[key] = { t = core.now().sec }
    npending = npending + 1
    txn:set_var("txn.mlr_pair", key)
  else
    pair_counts.unpaired = pair_counts.unpaired + 1
  end
  inflight = inflight + 1
  core.register_task(function()
    send(url, copy, body, key)
  end)
end, 2)

local function label_value(v)
  return (v:gsub("\\", "\\\\"):gsub('"', '\\"'):gsub("\n", "\\n"))
end

core.register_service("mlrollout_mirror_metrics", "http", function(applet)
  local lines = {
    "# HELP mlrollout_mirror_requests_total Mirrored copies of user requests, by what became of them.",
    "# TYPE mlrollout_mirror_requests_total counter",
  }
  for _, result in ipairs({ "ok", "error", "dropped", "skipped" }) do
    lines[#lines + 1] = string.format('mlrollout_mirror_requests_total{result="%s"} %d', result, counts[result])
  end
  lines[#lines + 1] = "# HELP mlrollout_mirror_inflight Mirrored copies waiting for the canary's answer."
  lines[#lines + 1] = "# TYPE mlrollout_mirror_inflight gauge"
  lines[#lines + 1] = string.format("mlrollout_mirror_inflight %d", inflight)
  lines[#lines + 1] = "# HELP mlrollout_mirror_pairs_total Mirrored requests whose two answers were compared, or not."
  lines[#lines + 1] = "# TYPE mlrollout_mirror_pairs_total counter"
  for _, result in ipairs({ "paired", "unpaired" }) do
    lines[#lines + 1] = string.format('mlrollout_mirror_pairs_total{result="%s"} %d', result, pair_counts[result])
  end
  lines[#lines + 1] = "# HELP mlrollout_mirror_label_rows_total Rows of mirrored requests whose predicted label "
    .. "the canary's answer and the user's (stable's) answer agree on, or not."
  lines[#lines + 1] = "# TYPE mlrollout_mirror_label_rows_total counter"
  for k, a in pairs(agreement) do
    local model, cv, sv = k:match("^(.-)\t(.-)\t(.*)$")
    for _, result in ipairs({ "agree", "disagree" }) do
      lines[#lines + 1] = string.format(
        'mlrollout_mirror_label_rows_total{model="%s",version="%s",stable_version="%s",result="%s"} %d',
        label_value(model), label_value(cv), label_value(sv), result, a[result]
      )
    end
  end
  local text = table.concat(lines, "\n") .. "\n"
  applet:set_status(200)
  applet:add_header("content-type", "text/plain; version=0.0.4")
  applet:add_header("content-length", tostring(#text))
  applet:start_response()
  applet:send(text)
end)
