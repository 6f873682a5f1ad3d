// Transcript viewer: an MCP App (extension io.modelcontextprotocol/ui) for funasr-nano's transcribe_file,
// transcribe_url and get_transcript results. The host hands it the tool result over the Apps bridge
// (ui/initialize, then ui/notifications/tool-input and tool-result); while a job is queued or running it
// polls get_transcript through the host (tools/call) until the transcript is ready.
//
// Built into one self-contained file, server/viewer/transcript.html, by tools/build_viewer.sh.

import { App, PostMessageTransport, applyDocumentTheme, applyHostStyleVariables } from "@modelcontextprotocol/ext-apps";
import type { McpUiHostContext } from "@modelcontextprotocol/ext-apps";
import { type Segment, pyStrip, shortTime, toSrt, toTxt, toVtt } from "./formats";

const POLL_MS = 2000;
const MAX_PAGES = 500;
const SPEAKER_COLOURS = ["#2f6fde", "#c2410c", "#15803d", "#9333ea", "#b91c1c", "#0e7490", "#a16207", "#be185d"];

interface Progress {
  done_s?: number;
  total_s?: number;
  fraction?: number;
  queue_position?: number;
  message?: string;
}

interface Page {
  offset: number;
  count: number;
  total: number;
  next_offset: number | null;
}

interface Transcript {
  status?: "completed" | "queued" | "running";
  job_id?: string;
  source?: string;
  text?: string | null;
  language?: string | null;
  language_name?: string | null;
  duration_s?: number | null;
  segments?: Segment[] | null;
  progress?: Progress | null;
  warnings?: string[];
  model?: { name?: string; dtype?: string; quantization?: number | null } | null;
  text_complete?: boolean;
  page?: Page | null;
  segment_count?: number | null;
}

interface ToolResult {
  isError?: boolean;
  content?: Array<{ type: string; text?: string }>;
  structuredContent?: Record<string, unknown>;
}

const $ = <T extends HTMLElement = HTMLElement>(id: string) => document.getElementById(id) as T;
const ui = {
  source: $("source"),
  meta: $("meta"),
  status: $("status"),
  error: $("error"),
  progress: $("progress"),
  bar: document.querySelector<HTMLElement>(".bar")!,
  fill: $("fill"),
  progressMsg: $("progress-msg"),
  warnings: $("warnings"),
  toolbar: $("toolbar"),
  search: $<HTMLInputElement>("search"),
  count: $("count"),
  copy: $<HTMLButtonElement>("copy"),
  done: $("done"),
  segments: $("segments"),
  plain: $("plain"),
};

const app = new App({ name: "funasr-nano transcript viewer", version: "0.1.0" }, {}, { autoResize: true });

// What is on screen; `generation` makes a stale poll or page load drop its answer.
let generation = 0;
let current: Transcript | null = null;
let shownSegments: Segment[] = [];
let fullText = "";
let timer: ReturnType<typeof setTimeout> | undefined;

function setText(el: HTMLElement, text: string) {
  el.textContent = text;
}

function show(el: HTMLElement, visible: boolean) {
  el.hidden = !visible;
}

function contentText(result: ToolResult): string {
  return (result.content ?? []).filter((c) => c.type === "text" && c.text).map((c) => c.text as string).join("\n");
}

function errorText(result: ToolResult): string {
  return contentText(result) || "The tool reported an error.";
}

function baseName(source: string): string {
  let path = source;
  try {
    if (/^[a-z][a-z0-9+.-]*:\/\//i.test(source)) path = decodeURIComponent(new URL(source).pathname);
  } catch {
    /* not a URL after all */
  }
  const parts = path.split(/[\\/]/).filter(Boolean);
  return parts.length ? parts[parts.length - 1] : source;
}

function fileStem(source: string | undefined): string {
  const name = baseName(source ?? "").replace(/\.[^.]{1,8}$/, "");
  const safe = name.replace(/[^\p{L}\p{N}._ -]+/gu, "_").trim();
  return safe || "transcript";
}

function formatDuration(seconds: number): string {
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const r = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${r}` : `${m}:${r}`;
}

function renderHeader(t: Transcript) {
  if (t.source) {
    setText(ui.source, baseName(t.source));
    ui.source.title = t.source;
  }
  const bits: string[] = [];
  if (t.language_name || t.language) {
    bits.push(t.language_name && t.language ? `${t.language_name} (${t.language})` : (t.language_name ?? t.language)!);
  } else if (t.status === "completed") {
    bits.push("language unknown");
  }
  if (typeof t.duration_s === "number") bits.push(formatDuration(t.duration_s));
  const n = t.segment_count ?? t.segments?.length;
  if (t.status === "completed" && n) bits.push(`${n} segment${n === 1 ? "" : "s"}`);
  if (t.model?.name) bits.push(t.model.name);
  ui.meta.replaceChildren(
    ...bits.map((b) => {
      const span = document.createElement("span");
      span.textContent = b;
      return span;
    }),
  );
}

function renderWarnings(warnings: string[] | undefined) {
  const items = (warnings ?? []).filter((w) => w && w.trim());
  ui.warnings.replaceChildren(
    ...items.map((w) => {
      const li = document.createElement("li");
      li.textContent = w;
      return li;
    }),
  );
  show(ui.warnings, items.length > 0);
}

function showStatus(message: string | null) {
  setText(ui.status, message ?? "");
  show(ui.status, Boolean(message));
}

function showError(message: string) {
  stopPolling();
  setText(ui.error, message);
  show(ui.error, true);
  show(ui.progress, false);
  showStatus(null);
}

function stopPolling() {
  if (timer !== undefined) clearTimeout(timer);
  timer = undefined;
}

function canCallTools(): boolean {
  return Boolean(app.getHostCapabilities()?.serverTools);
}

// ---- progress ----------------------------------------------------------------------------------------------

function renderProgress(t: Transcript) {
  show(ui.toolbar, false);
  show(ui.segments, false);
  show(ui.plain, false);
  show(ui.error, false);
  const p = t.progress ?? {};
  const fraction = Math.min(1, Math.max(0, Number(p.fraction ?? 0) || 0));
  const percent = Math.round(fraction * 100);
  ui.fill.style.width = `${fraction * 100}%`;
  ui.bar.setAttribute("aria-valuenow", String(percent));
  const state = t.status === "queued" ? "Queued" : "Transcribing";
  setText(ui.progressMsg, `${state} · ${percent}%${p.message ? ` · ${p.message}` : ""}`);
  show(ui.progress, true);
  showStatus(null);
}

function schedulePoll(jobId: string, gen: number) {
  stopPolling();
  timer = setTimeout(() => void poll(jobId, gen), POLL_MS);
}

async function poll(jobId: string, gen: number) {
  let result: ToolResult;
  try {
    result = (await app.callServerTool({
      name: "get_transcript",
      arguments: { job_id: jobId, wait: false, include_segments: true },
    })) as ToolResult;
  } catch (err) {
    if (gen === generation) showError(`Could not get the transcript: ${err instanceof Error ? err.message : err}`);
    return;
  }
  if (gen !== generation) return;
  if (result.isError) {
    showError(errorText(result));
    return;
  }
  handle(result, gen);
}

// ---- the transcript ----------------------------------------------------------------------------------------

function speakerClassifier(segments: Segment[]): (speaker: string) => string {
  const colours = new Map<string, string>();
  for (const s of segments) {
    if (s.speaker && !colours.has(s.speaker)) {
      colours.set(s.speaker, SPEAKER_COLOURS[colours.size % SPEAKER_COLOURS.length]);
    }
  }
  return (speaker) => colours.get(speaker) ?? SPEAKER_COLOURS[0];
}

function renderTranscript(t: Transcript) {
  show(ui.progress, false);
  show(ui.error, false);
  stopPolling();
  const segments = (t.segments ?? []).filter((s) => s && typeof s.start === "number");
  shownSegments = segments;
  fullText = t.text ?? segments.map((s) => pyStrip(s.text)).filter(Boolean).join(" ");

  const hasSpeakers = segments.some((s) => s.speaker);
  const colourOf = speakerClassifier(segments);
  ui.segments.replaceChildren(
    ...segments.map((s) => {
      const li = document.createElement("li");
      li.className = "seg";
      const time = document.createElement("span");
      time.className = "time";
      time.textContent = `${shortTime(s.start)}–${shortTime(s.end)}`;
      const spk = document.createElement("span");
      if (s.speaker) {
        spk.className = "spk";
        spk.textContent = s.speaker;
        spk.style.setProperty("--spk", colourOf(s.speaker));
      } else {
        spk.className = hasSpeakers ? "spk spk-none" : "spk-none";
      }
      const text = document.createElement("span");
      text.className = "text";
      text.textContent = s.text;
      li.append(time, spk, text);
      return li;
    }),
  );
  show(ui.segments, segments.length > 0);
  setText(ui.plain, fullText);
  show(ui.plain, segments.length === 0 && Boolean(fullText));
  show(ui.toolbar, segments.length > 0 || Boolean(fullText));
  showStatus(segments.length === 0 && !fullText ? "No speech was recognised." : null);
  applySearch();
}

/** Segments for the subtitle files: those shown, or one over the whole audio when there are none. */
function exportSegments(): Segment[] {
  if (shownSegments.length) return shownSegments;
  return [{ start: 0, end: current?.duration_s ?? 0, text: fullText }];
}

// A completed result without segments (transcribe_file's default), or one page of a long transcript:
// fetch the segments through get_transcript so that the list and the subtitles cover the whole audio.
async function completeTranscript(t: Transcript, gen: number) {
  const needSegments = t.segments == null;
  const nextOffset = t.page?.next_offset;
  if (!t.job_id || !canCallTools() || (!needSegments && (t.text_complete !== false || nextOffset == null))) return;
  const jobId = t.job_id;
  const merged: Transcript = { ...t };
  let segments = needSegments ? [] : [...(t.segments ?? [])];
  let texts = needSegments ? [] : [t.text ?? ""];
  let offset: number | null | undefined = needSegments ? undefined : nextOffset;
  for (let pages = 0; pages < MAX_PAGES; pages++) {
    const total = merged.segment_count ?? merged.page?.total;
    if (!needSegments || pages > 0) showStatus(`Loading the rest of the transcript… ${segments.length}${total ? ` of ${total}` : ""} segments`);
    const args: Record<string, unknown> = { job_id: jobId, wait: false, include_segments: true };
    if (offset != null) args.offset = offset;
    let result: ToolResult;
    try {
      result = (await app.callServerTool({ name: "get_transcript", arguments: args })) as ToolResult;
    } catch (err) {
      result = { isError: true, content: [{ type: "text", text: String(err instanceof Error ? err.message : err) }] };
    }
    if (gen !== generation) return;
    const part = (result.structuredContent ?? null) as Transcript | null;
    if (result.isError || !part || part.status !== "completed" || !Array.isArray(part.segments)) {
      if (!needSegments || pages > 0) showStatus(`Showing ${segments.length} segments; the rest could not be loaded: ${errorText(result)}`);
      return;
    }
    segments = segments.concat(part.segments);
    texts.push(part.text ?? "");
    offset = part.page?.next_offset;
    if (part.text_complete !== false || offset == null) {
      merged.segments = segments;
      merged.text = needSegments && part.text_complete !== false ? part.text : texts.filter(Boolean).join(" ");
      merged.text_complete = true;
      merged.page = null;
      merged.segment_count = segments.length;
      current = merged;
      renderHeader(merged);
      renderTranscript(merged);
      return;
    }
  }
}

// ---- search ------------------------------------------------------------------------------------------------

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/** Puts `text` into `el` with every match of `re` in a <mark>; returns the number of matches. */
function highlight(el: HTMLElement, text: string, re: RegExp | null): number {
  if (!re) {
    el.textContent = text;
    return 0;
  }
  const nodes: Node[] = [];
  let last = 0;
  let n = 0;
  for (const m of text.matchAll(re)) {
    const at = m.index ?? 0;
    if (at > last) nodes.push(document.createTextNode(text.slice(last, at)));
    const mark = document.createElement("mark");
    mark.textContent = m[0];
    nodes.push(mark);
    last = at + m[0].length;
    n++;
  }
  if (last < text.length) nodes.push(document.createTextNode(text.slice(last)));
  el.replaceChildren(...nodes);
  return n;
}

function applySearch() {
  const query = ui.search.value.trim();
  const re = query ? new RegExp(escapeRegExp(query), "giu") : null;
  let matches = 0;
  let rows = 0;
  if (shownSegments.length) {
    const items = ui.segments.children;
    shownSegments.forEach((s, i) => {
      const li = items[i] as HTMLElement | undefined;
      if (!li) return;
      const n = highlight(li.querySelector(".text") as HTMLElement, s.text, re);
      matches += n;
      if (n) rows++;
      li.hidden = Boolean(re) && n === 0;
    });
  } else {
    matches = highlight(ui.plain, fullText, re);
  }
  if (!re) {
    setText(ui.count, "");
  } else if (!matches) {
    setText(ui.count, "No matches");
  } else {
    const m = `${matches} match${matches === 1 ? "" : "es"}`;
    setText(ui.count, shownSegments.length ? `${m} in ${rows} of ${shownSegments.length} segments` : m);
  }
}

// ---- copy and download -------------------------------------------------------------------------------------

function flash(message: string) {
  setText(ui.done, message);
  setTimeout(() => {
    if (ui.done.textContent === message) setText(ui.done, "");
  }, 3000);
}

async function copyText() {
  const text = fullText;
  try {
    await navigator.clipboard.writeText(text);
    flash("Copied");
    return;
  } catch {
    /* no clipboard permission in this frame: fall back to a selection */
  }
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.append(area);
  area.select();
  const ok = document.execCommand("copy");
  area.remove();
  flash(ok ? "Copied" : "Copy failed: the host does not allow the clipboard");
}

const MIME: Record<string, string> = { srt: "application/x-subrip", vtt: "text/vtt", txt: "text/plain" };

function rendition(format: string): string {
  if (format === "srt") return toSrt(exportSegments());
  if (format === "vtt") return toVtt(exportSegments());
  return toTxt(fullText);
}

async function download(format: string) {
  const name = `${fileStem(current?.source)}.${format}`;
  const content = rendition(format);
  if (app.getHostCapabilities()?.downloadFile) {
    // sandboxed frames usually may not download: ask the host
    try {
      const res = await app.downloadFile({
        contents: [{ type: "resource", resource: { uri: `file:///${encodeURIComponent(name)}`, mimeType: MIME[format], text: content } }],
      });
      flash(res?.isError ? "Download cancelled" : `Saved ${name}`);
      return;
    } catch {
      /* fall back to a link */
    }
  }
  const url = URL.createObjectURL(new Blob([content], { type: `${MIME[format]};charset=utf-8` }));
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  a.style.display = "none";
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  flash(`Downloaded ${name}`);
}

// ---- the bridge --------------------------------------------------------------------------------------------

function handle(result: ToolResult, gen: number) {
  if (result.isError) {
    showError(errorText(result));
    return;
  }
  const t = (result.structuredContent ?? null) as Transcript | null;
  if (!t || typeof t !== "object" || (!t.status && t.text == null && !t.segments)) {
    // a host that forwards only the text channel
    const text = contentText(result);
    current = { text, status: "completed" };
    renderTranscript(current);
    return;
  }
  current = t;
  renderHeader(t);
  renderWarnings(t.warnings);
  if (t.status === "queued" || t.status === "running") {
    renderProgress(t);
    if (!t.job_id) showError("The job has no job_id to follow.");
    else if (!canCallTools()) showStatus(`This host does not let the viewer call tools: ask for get_transcript with job_id ${t.job_id}.`);
    else schedulePoll(t.job_id, gen);
    return;
  }
  renderTranscript(t);
  void completeTranscript(t, gen);
}

function applyContext(ctx: McpUiHostContext | undefined) {
  if (!ctx) return;
  if (ctx.theme) applyDocumentTheme(ctx.theme);
  if (ctx.styles?.variables) applyHostStyleVariables(ctx.styles.variables);
}

app.ontoolinput = (params) => {
  const args = (params.arguments ?? {}) as Record<string, unknown>;
  const source = args.path ?? args.url;
  if (typeof source === "string" && !current) {
    setText(ui.source, baseName(source));
    ui.source.title = source;
    showStatus(`Transcribing ${baseName(source)}…`);
  }
};
app.ontoolresult = (params) => {
  generation++;
  stopPolling();
  handle(params as ToolResult, generation);
};
app.ontoolcancelled = (params) => {
  generation++;
  stopPolling();
  showError(`The transcription was cancelled${params.reason ? `: ${params.reason}` : "."}`);
};
app.onhostcontextchanged = (ctx) => applyContext(ctx);
app.onteardown = async () => {
  generation++;
  stopPolling();
  return {};
};

ui.search.addEventListener("input", applySearch);
ui.copy.addEventListener("click", () => void copyText());
for (const button of document.querySelectorAll<HTMLButtonElement>("button[data-format]")) {
  button.addEventListener("click", () => void download(button.dataset.format!));
}

app
  .connect(new PostMessageTransport(window.parent, window.parent))
  .then(() => applyContext(app.getHostContext()))
  .catch((err) => showError(`Could not connect to the host: ${err instanceof Error ? err.message : err}`));
