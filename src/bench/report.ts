/**
 * The benchmark's output: a text table per workload, the ratios of this daemon to qemu-storage-daemon
 * and to the bare file, a JSON document with everything, and a hand-written SVG bar chart of the ratios.
 */
import type { TargetResult, WorkloadSpec } from './run.js';

/** One workload's results. */
export interface WorkloadReport {
  workload: WorkloadSpec;
  results: TargetResult[];
  ratios: Ratios;
}

/** This daemon (file backend) relative to the reference targets; NaN when a side is missing. */
export interface Ratios {
  iopsVsQsd: number;
  iopsVsBare: number;
  cpuPerIoVsQsd: number;
  cpuPerIoVsBare: number;
  /** The null backend's IOPS relative to this daemon's file backend: how much the file I/O costs. */
  nullIopsVsFile: number;
}

function get(results: TargetResult[], name: string): TargetResult | undefined {
  return results.find((r) => r.target === name && r.ok);
}

/** Ratios of one workload's results. */
export function ratiosOf(results: TargetResult[]): Ratios {
  const ours = get(results, 'vhost-blk');
  const nul = get(results, 'vhost-blk-null');
  const qsd = get(results, 'qemu-storage-daemon');
  const bare = get(results, 'bare');
  const div = (a: number | undefined, b: number | undefined) => (a !== undefined && b !== undefined && b > 0 ? a / b : NaN);
  return {
    iopsVsQsd: div(ours?.iops, qsd?.iops),
    iopsVsBare: div(ours?.iops, bare?.iops),
    cpuPerIoVsQsd: div(ours?.backendCpuUsPerIo, qsd?.backendCpuUsPerIo),
    cpuPerIoVsBare: div(ours?.backendCpuUsPerIo, bare?.backendCpuUsPerIo),
    nullIopsVsFile: div(nul?.iops, ours?.iops),
  };
}

function fmt(n: number, digits = 0): string {
  if (!Number.isFinite(n)) return '-';
  return n.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

function fmtLat(us: number): string {
  if (!Number.isFinite(us)) return '-';
  return us < 100 ? us.toFixed(1) : us.toFixed(0);
}

function fmtRatio(r: number): string {
  return Number.isFinite(r) ? `${r.toFixed(2)}x` : '-';
}

/** A short label such as "4k randread qd32 x1q". */
export function workloadLabel(w: WorkloadSpec): string {
  const bs = w.bs % 1024 === 0 ? `${w.bs / 1024}k` : `${w.bs}`;
  return `${bs} ${w.rw}${w.rw === 'randrw' ? `(${w.rwmixread}% read)` : ''} qd${w.iodepth}${w.queues > 1 ? ` x${w.queues} queues` : ''}`;
}

const COLUMNS = ['target', 'IOPS', 'MiB/s', 'p50 µs', 'p99 µs', 'p99.9 µs', 'backend CPU µs/IO', 'backend cores', 'loadgen CPU µs/IO', 'other load'];

function row(r: TargetResult): string[] {
  if (!r.ok && r.ios === 0) return [`${r.target} (FAILED)`, '-', '-', '-', '-', '-', '-', '-', '-', '-'];
  return [
    r.target + (r.ok ? '' : ' (errors)'), fmt(r.iops), fmt(r.mibps, 1), fmtLat(r.latency.p50Us), fmtLat(r.latency.p99Us),
    fmtLat(r.latency.p999Us), fmt(r.backendCpuUsPerIo, 2), fmt(r.backendCores, 2), fmt(r.loadgenCpuUsPerIo, 2),
    fmt(r.otherCores, 2),
  ];
}

/** A plain-text table (also valid Markdown) of one workload. */
export function formatTable(rep: WorkloadReport, markdown = false): string {
  const rows = [COLUMNS, ...rep.results.map(row)];
  const widths = COLUMNS.map((_, c) => Math.max(...rows.map((r) => r[c].length)));
  const line = (cells: string[]) => (markdown ? '| ' : '') + cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join(markdown ? ' | ' : '  ') + (markdown ? ' |' : '');
  const out = [line(rows[0])];
  if (markdown) out.push('|' + widths.map((w, i) => (i === 0 ? '-'.repeat(w + 1) + '-' : '-'.repeat(w + 1) + ':')).join('|') + '|');
  else out.push(widths.map((w) => '-'.repeat(w)).join('  '));
  for (const r of rows.slice(1)) out.push(line(r));
  for (const r of rep.results) if (!r.ok) out.push(`${r.target}: ${r.error ?? 'failed'}`);
  return out.join('\n');
}

/** One line of ratios for a workload. */
export function formatRatios(r: Ratios): string {
  return `vhost-blk / qemu-storage-daemon: IOPS ${fmtRatio(r.iopsVsQsd)}, CPU/IO ${fmtRatio(r.cpuPerIoVsQsd)}   ` +
    `vhost-blk / bare: IOPS ${fmtRatio(r.iopsVsBare)}, CPU/IO ${fmtRatio(r.cpuPerIoVsBare)}   ` +
    `null / file backend IOPS ${fmtRatio(r.nullIopsVsFile)}`;
}

/** A summary table of the ratios of every workload. */
export function formatRatioTable(reps: WorkloadReport[], markdown = false): string {
  const head = ['workload', 'IOPS vs qsd', 'IOPS vs bare', 'CPU/IO vs qsd', 'CPU/IO vs bare', 'null IOPS / file IOPS'];
  const rows = [head, ...reps.map((w) => [
    workloadLabel(w.workload), fmtRatio(w.ratios.iopsVsQsd), fmtRatio(w.ratios.iopsVsBare), fmtRatio(w.ratios.cpuPerIoVsQsd),
    fmtRatio(w.ratios.cpuPerIoVsBare), fmtRatio(w.ratios.nullIopsVsFile),
  ])];
  const widths = head.map((_, c) => Math.max(...rows.map((r) => r[c].length)));
  const line = (cells: string[]) => (markdown ? '| ' : '') + cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join(markdown ? ' | ' : '  ') + (markdown ? ' |' : '');
  const out = [line(head)];
  if (markdown) out.push('|' + widths.map((w, i) => (i === 0 ? '-'.repeat(w + 2) : '-'.repeat(w + 1) + ':')).join('|') + '|');
  else out.push(widths.map((w) => '-'.repeat(w)).join('  '));
  for (const r of rows.slice(1)) out.push(line(r));
  return out.join('\n');
}

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

/**
 * A grouped bar chart: per workload, vhost-blk's IOPS and CPU per I/O relative to qemu-storage-daemon
 * and to the bare file, with the 1.0 line marked. Higher IOPS ratios and lower CPU ratios are better.
 */
export function renderSvg(reps: WorkloadReport[], title: string, subtitle: string): string {
  const series: Array<{ key: keyof Ratios; label: string; color: string }> = [
    { key: 'iopsVsQsd', label: 'IOPS: vhost-blk / qemu-storage-daemon (higher is better)', color: '#2b6cb0' },
    { key: 'iopsVsBare', label: 'IOPS: vhost-blk / bare io_uring (at most 1)', color: '#90cdf4' },
    { key: 'cpuPerIoVsQsd', label: 'CPU per I/O: vhost-blk / qemu-storage-daemon (lower is better)', color: '#c05621' },
    { key: 'cpuPerIoVsBare', label: 'CPU per I/O: vhost-blk / bare io_uring', color: '#fbd38d' },
  ];
  const values = reps.flatMap((w) => series.map((s) => w.ratios[s.key])).filter(Number.isFinite);
  const maxV = Math.max(1.5, ...values);
  const top = Math.ceil(maxV * 2) / 2;
  const barW = 22;
  const gap = 6;
  const groupW = series.length * (barW + gap) + 40;
  const left = 60;
  const plotTop = 70;
  const plotH = 300;
  const width = Math.max(720, left + reps.length * groupW + 30);
  const legendY = plotTop + plotH + 70;
  const height = legendY + series.length * 20 + 20;
  const y = (v: number) => plotTop + plotH - (Math.min(v, top) / top) * plotH;
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="12">`);
  out.push(`<rect width="${width}" height="${height}" fill="#ffffff"/>`);
  out.push(`<text x="${left}" y="24" font-size="16" font-weight="bold">${esc(title)}</text>`);
  out.push(`<text x="${left}" y="44" fill="#555">${esc(subtitle)}</text>`);
  // Grid and axis.
  const step = top <= 2 ? 0.25 : top <= 5 ? 0.5 : 1;
  for (let v = 0; v <= top + 1e-9; v += step) {
    const yy = y(v).toFixed(1);
    out.push(`<line x1="${left}" y1="${yy}" x2="${width - 20}" y2="${yy}" stroke="${Math.abs(v - 1) < 1e-9 ? '#000' : '#e2e2e2'}" stroke-width="${Math.abs(v - 1) < 1e-9 ? 1.5 : 1}"${Math.abs(v - 1) < 1e-9 ? ' stroke-dasharray="6 3"' : ''}/>`);
    out.push(`<text x="${left - 6}" y="${(y(v) + 4).toFixed(1)}" text-anchor="end" fill="#333">${v.toFixed(2)}</text>`);
  }
  out.push(`<text x="16" y="${plotTop + plotH / 2}" transform="rotate(-90 16 ${plotTop + plotH / 2})" text-anchor="middle" fill="#333">ratio (1.00 = equal)</text>`);
  reps.forEach((w, g) => {
    const gx = left + 20 + g * groupW;
    series.forEach((s, i) => {
      const v = w.ratios[s.key];
      const x = gx + i * (barW + gap);
      if (!Number.isFinite(v)) {
        out.push(`<text x="${x + barW / 2}" y="${y(0) - 4}" text-anchor="middle" fill="#999">n/a</text>`);
        return;
      }
      const yy = y(v);
      out.push(`<rect x="${x}" y="${yy.toFixed(1)}" width="${barW}" height="${(y(0) - yy).toFixed(1)}" fill="${s.color}"><title>${esc(`${workloadLabel(w.workload)}: ${s.label}: ${v.toFixed(3)}`)}</title></rect>`);
      out.push(`<text x="${x + barW / 2}" y="${(yy - 4).toFixed(1)}" text-anchor="middle" font-size="10">${v.toFixed(2)}${v > top ? '↑' : ''}</text>`);
    });
    const cx = gx + (series.length * (barW + gap)) / 2 - gap / 2;
    const label = workloadLabel(w.workload);
    const parts = label.length > 18 ? [label.slice(0, label.indexOf(' ', 8) > 0 ? label.indexOf(' ', 8) : 18), label.slice(label.indexOf(' ', 8) > 0 ? label.indexOf(' ', 8) + 1 : 18)] : [label];
    parts.forEach((p, k) => out.push(`<text x="${cx.toFixed(1)}" y="${plotTop + plotH + 18 + k * 14}" text-anchor="middle">${esc(p)}</text>`));
  });
  series.forEach((s, i) => {
    const ly = legendY + i * 20;
    out.push(`<rect x="${left}" y="${ly - 10}" width="14" height="14" fill="${s.color}"/>`);
    out.push(`<text x="${left + 22}" y="${ly + 1}">${esc(s.label)}</text>`);
  });
  out.push('</svg>');
  return out.join('\n') + '\n';
}
