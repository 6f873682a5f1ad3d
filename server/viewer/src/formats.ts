// Subtitle and text renditions of a transcript, byte for byte as asr/writers.py writes them
// (tests/test_viewer.py compares the downloads with that module's output).

export interface Segment {
  start: number;
  end: number;
  text: string;
  speaker?: string | null;
}

// The characters Python's str.strip() removes (str.isspace), which differ a little from JS's trim().
const PY_SPACE = "\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
const STRIP = new RegExp(`^[${PY_SPACE}]+|[${PY_SPACE}]+$`, "g");

export function pyStrip(s: string): string {
  return s.replace(STRIP, "");
}

// Python's round(): half to even. Doubles are the same on both sides, so seconds * 1000 is too.
function pyRound(x: number): number {
  const f = Math.floor(x);
  const d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

const pad = (n: number, width: number) => String(n).padStart(width, "0");

/** hh:mm:ss<sep>mmm, as writers._clock. */
export function clock(seconds: number, sep: string): string {
  let ms = Math.max(0, pyRound(seconds * 1000));
  const h = Math.floor(ms / 3_600_000);
  ms -= h * 3_600_000;
  const m = Math.floor(ms / 60_000);
  ms -= m * 60_000;
  const s = Math.floor(ms / 1000);
  ms -= s * 1000;
  return `${pad(h, 2)}:${pad(m, 2)}:${pad(s, 2)}${sep}${pad(ms, 3)}`;
}

export function toSrt(segments: Segment[]): string {
  const blocks: string[] = [];
  let i = 0;
  for (const seg of segments) {
    const text = pyStrip(seg.text);
    if (!text) continue;
    i += 1;
    blocks.push(`${i}\n${clock(seg.start, ",")} --> ${clock(seg.end, ",")}\n${text}\n`);
  }
  return blocks.join("\n");
}

export function toVtt(segments: Segment[]): string {
  const lines = ["WEBVTT", ""];
  for (const seg of segments) {
    const text = pyStrip(seg.text);
    if (text) lines.push(`${clock(seg.start, ".")} --> ${clock(seg.end, ".")}`, text, "");
  }
  return lines.join("\n");
}

export function toTxt(text: string): string {
  return pyStrip(text) + "\n";
}

/** mm:ss.s for the list (h:mm:ss.s past an hour). */
export function shortTime(seconds: number): string {
  const tenths = Math.max(0, Math.round(seconds * 10));
  const h = Math.floor(tenths / 36_000);
  const m = Math.floor((tenths % 36_000) / 600);
  const s = (tenths % 600) / 10;
  const ss = s.toFixed(1).padStart(4, "0");
  return h ? `${h}:${pad(m, 2)}:${ss}` : `${pad(m, 2)}:${ss}`;
}
