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

local MAX_INFLIGHT = 32
local TIMEOUT_MS = 5000

local inflight = 0
local counts = { ok = 0, error = 0, dropped = 0, skipped = 0 }

local function send(url, headers, body)
  local ok, res = pcall(function()
    local hc = core.httpclient()
    return hc:post({ url = url, headers = headers, body = body, timeout = TIMEOUT_MS })
  end)
  -- the canary's own errors are in its metrics; here "error" is any copy without a 2xx answer
  if ok and res and res.status and res.status >= 200 and res.status < 300 then
    counts.ok = counts.ok + 1
  else
    counts.error = counts.error + 1
  end
  inflight = inflight - 1
end

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
  inflight = inflight + 1
  core.register_task(function()
    send(url, copy, body)
  end)
end, 2)

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
  local text = table.concat(lines, "\n") .. "\n"
  applet:set_status(200)
  applet:add_header("content-type", "text/plain; version=0.0.4")
  applet:add_header("content-length", tostring(#text))
  applet:start_response()
  applet:send(text)
end)
