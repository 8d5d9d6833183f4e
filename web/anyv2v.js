// AnyV2V's frontend extension: CaptureFeatures shows only the taus that act on the backbone its inversion
// comes from. The UNets (I2VGen-XL, ConsistI2V, SEINE; DDIMInvertVideo) inject conv features and spatial /
// temporal attention; Wan (AnyV2VFlowInvertVideo) has one joint attention, so only attention_tau acts there.
// Hidden widgets keep their values: saved workflows and the API prompt are the same with or without this file.
import { app } from "../../scripts/app.js";

const TAUS_BY_INVERTER = {
  DDIMInvertVideo: ["conv_tau", "spatial_tau", "temporal_tau"],
  AnyV2VFlowInvertVideo: ["attention_tau"],
};
const ALL_TAUS = Object.values(TAUS_BY_INVERTER).flat();

function inverterType(node) {
  const input = node.inputs?.find((slot) => slot.name === "inversion");
  if (input?.link == null || !node.graph) return undefined;
  const link = node.graph.links.get?.(input.link) ?? node.graph.links[input.link];
  return link && node.graph.getNodeById(link.origin_id)?.type;
}

// An unconnected CaptureFeatures (or one after an unknown node) shows every tau.
function showActingTaus(node) {
  const acting = TAUS_BY_INVERTER[inverterType(node)] ?? ALL_TAUS;
  let changed = false;
  for (const widget of node.widgets ?? []) {
    if (!ALL_TAUS.includes(widget.name)) continue;
    const hidden = !acting.includes(widget.name);
    changed ||= Boolean(widget.hidden) !== hidden;
    widget.hidden = hidden;
  }
  if (changed) {
    node.setSize([node.size[0], node.computeSize()[1]]);
    node.setDirtyCanvas(true, true);
  }
}

app.registerExtension({
  name: "AnyV2V.CaptureFeaturesTaus",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "CaptureFeatures") return;
    const onConnectionsChange = nodeType.prototype.onConnectionsChange;
    nodeType.prototype.onConnectionsChange = function (...args) {
      const result = onConnectionsChange?.apply(this, args);
      showActingTaus(this);
      return result;
    };
  },
  // after a whole graph is loaded: the inversion's origin node exists by then
  loadedGraphNode(node) {
    if (node.type === "CaptureFeatures") showActingTaus(node);
  },
});
