// Where each node goes: token positions left to right, layers bottom to top (prompt tokens along the
// bottom, logits on top). Nodes sharing a (layer, position) cell sit side by side, wrapping onto
// extra lines when there are many; a column is as wide as its most crowded cell.

export const SPACING = 16; // world units between neighbouring nodes in a cell
const WRAP = 12; // nodes per line within a cell
const MIN_COLUMN = 64;
const ROW_GAP = 44;
const LOGIT_SPACING = 40;

/** Adds x, y (world units, y down) to every node; returns {width, height, rows, columns}. */
export function layout(nodes, nLayers, nPos) {
  const rowOf = (n) => (n.kind === "embedding" ? 0 : n.kind === "logit" ? nLayers + 1 : n.layer + 1);
  const nRows = nLayers + 2;
  const cells = new Map(); // row * nPos + pos -> nodes
  for (const n of nodes) {
    const key = rowOf(n) * nPos + n.pos;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  const colSlots = new Array(nPos).fill(1);
  const rowLines = new Array(nRows).fill(1);
  for (const [key, members] of cells) {
    const row = Math.floor(key / nPos);
    const pos = key % nPos;
    colSlots[pos] = Math.max(colSlots[pos], Math.min(members.length, WRAP));
    rowLines[row] = Math.max(rowLines[row], Math.ceil(members.length / WRAP));
  }
  const columns = [];
  let x = 0;
  for (let p = 0; p < nPos; p++) {
    const width = Math.max(MIN_COLUMN, colSlots[p] * SPACING + 8);
    columns.push({ x, width });
    x += width;
  }
  // Rows tall enough for the whole to be about half as high as wide (a long prompt would otherwise
  // squash the layers into a strip); row 0 at the bottom has the largest y.
  const gap = Math.min(240, Math.max(ROW_GAP, (0.5 * x) / nRows));
  const rows = new Array(nRows);
  let y = 0;
  for (let r = nRows - 1; r >= 0; r--) {
    const height = gap + (rowLines[r] - 1) * SPACING;
    rows[r] = { y, height };
    y += height;
  }
  const order = { feature: 0, error: 1, embedding: 2, logit: 3 };
  for (const [key, members] of cells) {
    const row = rows[Math.floor(key / nPos)];
    const col = columns[key % nPos];
    // features by feature index, error nodes last: a stable place for each node across thresholds
    members.sort((a, b) => order[a.kind] - order[b.kind] || a.feature - b.feature || a.token - b.token);
    if (members[0].kind === "logit") {
      // the outputs spread out along the top, most probable first, room for their rotated labels
      members.sort((a, b) => b.probability - a.probability);
      members.forEach((n, i) => {
        n.x = col.x + col.width / 2 + (i - (members.length - 1) / 2) * LOGIT_SPACING;
        n.y = row.y + row.height / 2;
      });
      continue;
    }
    const perLine = Math.min(members.length, WRAP);
    members.forEach((n, i) => {
      const line = Math.floor(i / WRAP);
      const inLine = line === Math.floor((members.length - 1) / WRAP) ? members.length - line * WRAP : perLine;
      const slot = i % WRAP;
      n.x = col.x + col.width / 2 + (slot - (inLine - 1) / 2) * SPACING;
      n.y = row.y + row.height / 2 + (line - (Math.ceil(members.length / WRAP) - 1) / 2) * SPACING;
    });
  }
  let width = x;
  for (const n of nodes) width = Math.max(width, n.x + LOGIT_SPACING); // outputs may reach past the last column
  return { width, height: y, rows, columns };
}
