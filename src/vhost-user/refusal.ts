/** An error that refuses one front-end request with a reason for the log; the connection goes on. */
export class Refusal extends Error {}
