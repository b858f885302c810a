// The server's JSON API (see /openapi.json). Every call throws an Error holding the server's
// one-line message on a 4xx/5xx, so the UI can show it as it is.

async function call(method, url, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(url, init);
  const data = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) throw new Error(data.detail || `${response.status} ${response.statusText}`);
  return data;
}

const q = (params) => new URLSearchParams(params).toString();

export const api = {
  graphs: () => call("GET", "/api/graphs"),
  // a node threshold of 1 asks for every node and edge, unpruned
  graph: (path, nodeThreshold, edgeThreshold) =>
    call("GET", `/api/graph?${q(nodeThreshold >= 1 ? { path, full: true } : { path, node_threshold: nodeThreshold, edge_threshold: edgeThreshold })}`),
  saveState: (path, state) => call("PUT", `/api/graph/state?${q({ path })}`, state),
  feature: (path, layer, feature) => call("GET", `/api/graph/feature?${q({ path, layer, feature })}`),
  setLabel: (path, layer, feature, label) => call("PUT", `/api/graph/label?${q({ path })}`, { layer, feature, label }),
  intervene: (path, body) => call("POST", `/api/graph/intervene?${q({ path })}`, body),
  newGraph: (body) => call("POST", "/api/jobs", body),
  job: (id) => call("GET", `/api/jobs/${encodeURIComponent(id)}`),
  heads: (path, source, target) => call("GET", `/api/graph/heads?${q({ path, source, target })}`),
  circuit: (path) => call("GET", `/api/circuit?${q({ path })}`),
  saveCircuit: (path, supernodes) => call("PUT", `/api/circuit?${q({ path })}`, { supernodes }),
  validateCircuit: (path) => call("POST", `/api/circuit/validate?${q({ path })}`, {}),
  qk: (path, layer, head, query, key) => call("GET", `/api/graph/qk?${q({ path, layer, head, query, key })}`),
};
