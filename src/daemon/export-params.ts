/**
 * One definition of what an export is made of, as the operator writes it: the `export_add` parameters of
 * the management API, an entry of the config file's `exports`, and (flags in kebab-case) the single
 * export of `vhost-blk serve --socket ...`. Each field is checked once, here, with a message that says
 * what was expected; callers only choose how to name the field (`num_queues`, `exports[1].num_queues`,
 * `--num-queues`).
 */
import { readFileSync } from 'node:fs';
import { z } from 'zod';
import { parseFaultSpec } from '../backend/faults.js';
import { LOG_LEVELS } from '../logger.js';

/** A value as an error message quotes it. */
export function showValue(v: unknown): string {
  if (typeof v === 'string') return `'${v}'`;
  if (v === undefined) return 'nothing';
  return JSON.stringify(v) ?? String(v);
}

const SIZE_UNITS = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 } as const;

/** Parses a size such as 1G, 512M, 4096 (bytes; K, M, G, T are powers of 1024); null when it is not one. */
export function parseSizeText(raw: string): number | null {
  const m = /^(\d+)([KMGT]?)(i?B)?$/i.exec(raw.trim());
  if (!m) return null;
  return Number(m[1]) * SIZE_UNITS[m[2].toUpperCase() as keyof typeof SIZE_UNITS];
}

/** A group name (looked up in /etc/group) or number as a gid; null when there is no such group. */
export function groupId(raw: string | number): number | null {
  if (typeof raw === 'number' || /^\d+$/.test(raw)) return Number(raw);
  let groups = '';
  try {
    groups = readFileSync('/etc/group', 'utf8');
  } catch { /* no group database: only numbers work */ }
  for (const line of groups.split('\n')) {
    const [name, , gid] = line.split(':');
    if (name === raw && gid !== undefined && /^\d+$/.test(gid)) return Number(gid);
  }
  return null;
}

const isPowerOfTwo = (n: number) => n > 0 && (n & (n - 1)) === 0;
const required = (what: string) => (i: { input: unknown }) => i.input === undefined ? 'is required' : `must be ${what}, got ${showValue(i.input)}`;

/** A whole number in [min, max]. */
function wholeNumber(min: number, max: number) {
  const range = (i: { input: unknown }) => `must be between ${min} and ${max}, got ${showValue(i.input)}`;
  return z.int({ error: required('a whole number') }).min(min, { error: range }).max(max, { error: range });
}

/** A power of two in [min, max]. */
function powerOfTwo(min: number, max: number) {
  return wholeNumber(min, max).refine(isPowerOfTwo, { error: (i) => `must be a power of two, got ${showValue(i.input)}` });
}

/** Bytes, as a number or a text with a K/M/G/T suffix; a positive multiple of 512. */
export const sizeField = z.union([z.number(), z.string()], { error: required('a size such as 1G or 4096') })
  .transform((v, ctx) => {
    const n = typeof v === 'number' ? v : parseSizeText(v);
    if (n === null || !Number.isSafeInteger(n)) {
      ctx.addIssue({ code: 'custom', message: `must be a size such as 1G or 4096, got ${showValue(v)}` });
      return z.NEVER;
    }
    if (n <= 0 || n % 512 !== 0) {
      ctx.addIssue({ code: 'custom', message: `must be a positive multiple of 512 bytes, got ${showValue(v)}` });
      return z.NEVER;
    }
    return n;
  });

const ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$/;

/** An export's name: what every management call uses to find it. */
export const exportId = z.string({ error: required('a text') })
  .regex(ID_PATTERN, { error: (i) => `must be 1 to 64 letters, digits or . _ : @ - (starting with a letter or digit), got ${showValue(i.input)}` })
  .describe('Name of the export, unique in the daemon: letters, digits, `. _ : @ -`, at most 64.');

const path = (what: string) => z.string({ error: required('a path') }).min(1, { error: 'must not be empty' }).describe(what);

/** The fields of an export; cross-field rules are in exportParams. */
const exportFields = {
  id: exportId,
  socket: path('vhost-user socket the frontend (QEMU) connects to.'),
  socket_mode: z.string({ error: required("an octal mode in quotes, such as '0660'") })
    .regex(/^0?[0-7]{3}$/, { error: (i) => `must be an octal mode such as '0600', got ${showValue(i.input)}` }).default('0600')
    .describe('File mode of the socket, octal, as text (default `0600`: only the daemon\'s user may connect).'),
  socket_group: z.union([z.string(), z.int().min(0)], { error: required('a group name or number') })
    .refine((g) => groupId(g) !== null, { error: (i) => `names no group in /etc/group (give a name or a number), got ${showValue(i.input)}` }).optional()
    .describe('Group the socket is given to (name or number), e.g. with socket_mode `0660`.'),
  backend: z.enum(['file', 'null'], { error: (i) => `must be 'file' or 'null', got ${showValue(i.input)}` }).default('file')
    .describe('`file`: serve `image`. `null`: reads complete without data, writes are dropped (measures the protocol path alone).'),
  image: path('Raw image file or block device (file backend; required there).').optional(),
  size: sizeField.optional().describe('Disk size for the null backend (default 1G); bytes or with K, M, G, T.'),
  direct: z.boolean({ error: required('true or false') }).default(false).describe('Open the image with O_DIRECT (bypass the host page cache).'),
  readonly: z.boolean({ error: required('true or false') }).default(false).describe('Offer a read-only disk (VIRTIO_BLK_F_RO).'),
  num_queues: wholeNumber(1, 64).default(1).describe('Request queues, 1..64.'),
  queue_size: powerOfTwo(2, 32768).default(256).describe('Largest ring size accepted, a power of two 2..32768.'),
  writeback: z.boolean({ error: required('true or false') }).default(true).describe('Start with the write cache on (true) or in writethrough mode.'),
  serial: z.string({ error: required('a text') })
    .refine((s) => Buffer.byteLength(s) <= 20, { error: (i) => `is at most 20 bytes, got ${Buffer.byteLength(String(i.input))}` }).optional()
    .describe('What GET_ID returns, at most 20 bytes (default: derived from the image path).'),
  logical_block_size: powerOfTwo(512, 65536).default(512).describe('Logical block size, 512..65536, a power of two.'),
  physical_block_size: powerOfTwo(512, 1 << 24).optional().describe('Physical block size: a power-of-two multiple of the logical size (default 4096).'),
  inject_faults: z.string({ error: required('a fault spec') }).superRefine((spec, ctx) => {
    try {
      parseFaultSpec(spec);
    } catch (err) {
      ctx.addIssue({ code: 'custom', message: (err as Error).message });
    }
  }).optional().describe('For testing only: fail, delay or shorten matching requests (`eio:read@1M-2M,delay=10ms:write`).'),
};

/** An export's parameters, defaults filled in and every rule checked. */
export const exportParams = z.strictObject(exportFields, { error: objectError }).superRefine((p, ctx) => {
  const problem = (field: string, message: string) => ctx.addIssue({ code: 'custom', path: [field], message });
  if (p.backend === 'null' && p.image !== undefined) problem('image', 'cannot be used with the null backend');
  if (p.backend === 'null' && p.direct) problem('direct', 'applies to the file backend only');
  if (p.backend === 'file' && p.size !== undefined) problem('size', 'is for the null backend; the file backend takes the image size');
  if (p.backend === 'file' && p.image === undefined) problem('image', 'is required with the file backend');
  if (p.physical_block_size !== undefined && p.physical_block_size < p.logical_block_size) {
    problem('physical_block_size', `must be at least logical_block_size (${p.logical_block_size}), got ${p.physical_block_size}`);
  }
});

/** What an export is made of (decoded `export_add` parameters). */
export type ExportParams = z.output<typeof exportParams>;
/** An export as written by an operator, before defaults. */
export type ExportParamsInput = z.input<typeof exportParams>;

/** The daemon-wide settings: the config file's top level besides `exports`, and the `serve` flags of the same names. */
const daemonFields = {
  rpc_socket: path('Management socket (JSON-RPC 2.0, mode 0600).').optional(),
  threads: wholeNumber(1, 256).optional().describe('Queue worker threads shared by every export (default: the core count).'),
  poll_us: wholeNumber(0, 1000).default(32).describe('Poll the rings this long after work before sleeping (µs; 0 = never).'),
  log_level: z.enum(LOG_LEVELS, { error: (i) => `must be one of ${LOG_LEVELS.join(', ')}, got ${showValue(i.input)}` }).default('info')
    .describe('debug, info, warn or error.'),
};

/** The config file: daemon settings and the exports to serve. */
export const configFile = z.strictObject({
  ...daemonFields,
  exports: z.array(exportParams, { error: required('a list of exports') }).default([]).describe('The exports to serve.'),
}, { error: objectError }).superRefine((c, ctx) => {
  const seen = new Map<string, number>();
  const sockets = new Map<string, number>();
  c.exports.forEach((e, i) => {
    if (seen.has(e.id)) ctx.addIssue({ code: 'custom', path: ['exports', i, 'id'], message: `'${e.id}' is already the id of exports[${seen.get(e.id)}]` });
    if (sockets.has(e.socket)) ctx.addIssue({ code: 'custom', path: ['exports', i, 'socket'], message: `'${e.socket}' is already the socket of exports[${sockets.get(e.socket)}]` });
    seen.set(e.id, i);
    sockets.set(e.socket, i);
  });
});

/** Decoded config file. */
export type ConfigFile = z.output<typeof configFile>;

/** Names unknown keys; says "must be an object" to anything else. */
function objectError(i: { code?: string; input: unknown; keys?: string[] }): string {
  if (i.code === 'unrecognized_keys') return `unknown key${i.keys!.length > 1 ? 's' : ''} ${i.keys!.map((k) => `'${k}'`).join(', ')}`;
  return i.input === undefined ? 'is required' : `must be an object, got ${showValue(i.input)}`;
}

/** One problem with a value: where (a key path) and what was expected. */
export interface ParamProblem {
  path: Array<string | number>;
  message: string;
}

/** A decoded value, or the problems found (every one of them, in order). */
export type Decoded<T> = { ok: true; value: T } | { ok: false; problems: ParamProblem[] };

/** Checks `raw` against `schema`. */
export function decode<S extends z.ZodType>(schema: S, raw: unknown): Decoded<z.output<S>> {
  const r = schema.safeParse(raw);
  if (r.success) return { ok: true, value: r.data };
  return { ok: false, problems: r.error.issues.map((i) => ({ path: i.path.filter((k): k is string | number => typeof k !== 'symbol'), message: i.message })) };
}

/** A key path as the config file and the API name it: `exports[1].num_queues`. */
export function formatPath(path: ReadonlyArray<string | number>): string {
  return path.map((k, i) => typeof k === 'number' ? `[${k}]` : i === 0 ? k : `.${k}`).join('');
}

/** "field message" (or the message alone for the value as a whole). */
export function describeProblem(p: ParamProblem, name: (path: ReadonlyArray<string | number>) => string = formatPath): string {
  return p.path.length === 0 ? p.message : `${name(p.path)} ${p.message}`;
}
