/**
 * One line per event on stderr: time, level, message. Worker threads log through the control thread.
 */

/** Log levels, most verbose first. */
export const LOG_LEVELS = ['debug', 'info', 'warn', 'error'] as const;
/** A log level name. */
export type LogLevel = (typeof LOG_LEVELS)[number];

/** A leveled line logger. */
export class Logger {
  private readonly min: number;
  constructor(level: LogLevel = 'info', private readonly sink: (line: string) => void = (l) => process.stderr.write(l + '\n')) {
    this.min = LOG_LEVELS.indexOf(level);
  }

  /** Writes `msg` if `level` passes the threshold; newlines are folded so one event stays one line. */
  log(level: LogLevel, msg: string): void {
    if (LOG_LEVELS.indexOf(level) < this.min) return;
    this.sink(`${new Date().toISOString()} ${level.padEnd(5)} ${msg.replace(/\n\s*/g, ' | ')}`);
  }

  /** Debug-level line. */
  debug(msg: string): void { this.log('debug', msg); }
  /** Info-level line. */
  info(msg: string): void { this.log('info', msg); }
  /** Warning line. */
  warn(msg: string): void { this.log('warn', msg); }
  /** Error line. */
  error(msg: string): void { this.log('error', msg); }
}
