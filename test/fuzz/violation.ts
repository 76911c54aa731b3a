/**
 * What the fuzzers throw when an invariant breaks: distinct from anything the code under test throws, so
 * an exception that escapes it is reported as such rather than taken for a finding of ours.
 */

/** An invariant a fuzzer found broken. */
export class Violation extends Error {
  override name = 'Violation';
}

/** Throws a Violation saying `what` unless `cond` holds. */
export function check(cond: boolean, what: string): asserts cond {
  if (!cond) throw new Violation(what);
}
