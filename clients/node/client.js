// Tiny streamrec client: loads ../../proto/streamrec/v1/*.proto at run time (no code generation).
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomUUID } from 'node:crypto';
import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

export const PROTO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'proto');
const PROTO_FILES = ['streamrec/v1/events.proto', 'streamrec/v1/recommend.proto', 'streamrec/v1/catalog.proto'];

let cachedPackage;
export function loadProto() {
  if (!cachedPackage) {
    const definition = protoLoader.loadSync(PROTO_FILES, {
      keepCase: true, longs: String, enums: String, defaults: true, oneofs: true, includeDirs: [PROTO_ROOT],
    });
    cachedPackage = grpc.loadPackageDefinition(definition).streamrec.v1;
  }
  return cachedPackage;
}

/** 'purchase', 'PURCHASE', 'EVENT_TYPE_PURCHASE' or 4 -> 'EVENT_TYPE_PURCHASE' (or the number as given). */
export function eventType(nameOrNumber) {
  if (typeof nameOrNumber === 'number') return nameOrNumber;
  const name = String(nameOrNumber).trim().toUpperCase();
  return name.startsWith('EVENT_TYPE_') ? name : `EVENT_TYPE_${name}`;
}

/**
 * An Event message; event_id defaults to a fresh UUID (the server's idempotency key). recommendationId: the
 * answer the event responds to (a response's recommendation_id), so the server attributes the outcome to it.
 */
export function makeEvent(userId, itemId, type = 'view', { value = 0, timestampMs = 0, eventId, recommendationId = '' } = {}) {
  return {
    event_id: eventId ?? randomUUID(), user_id: userId, item_id: itemId, type: eventType(type),
    value, timestamp_ms: String(timestampMs), recommendation_id: recommendationId,
  };
}

export class StreamrecClient {
  /**
   * @param {string} address  host:port
   * @param {object} [options]
   * @param {string} [options.token]   sent as `authorization: Bearer <token>` metadata on every call
   * @param {boolean|object} [options.tls]  placeholder: true or {rootCerts, privateKey, certChain} (Buffers)
   *                                   uses TLS channel credentials; default plaintext
   * @param {number} [options.deadlineMs]  per-call deadline, default 10000
   * @param {'session'|'eventual'} [options.consistency]  'session' (default): reads carry the highest log seq
   *                                   this client has seen as min_seq, so any replica answers with state at
   *                                   least that new (read-your-writes); 'eventual': reads never wait
   */
  constructor(address, { token, tls, deadlineMs = 10_000, consistency = 'session' } = {}) {
    if (consistency !== 'session' && consistency !== 'eventual') {
      throw new TypeError(`consistency must be 'session' or 'eventual', not ${JSON.stringify(consistency)}`);
    }
    const v1 = loadProto();
    const credentials = tls
      ? grpc.credentials.createSsl(tls.rootCerts ?? null, tls.privateKey ?? null, tls.certChain ?? null)
      : grpc.credentials.createInsecure();
    this.address = address;
    this.deadlineMs = deadlineMs;
    this.token = token;
    this.consistency = consistency;
    // The highest log seq seen in any ack or answer (BigInt: uint64 overflows a Number). Kept under
    // 'eventual' too, so a caller can still read it and pass it on.
    this.sessionSeq = 0n;
    this.sessionLog = ''; // the log sessionSeq counts in (answers say which; another log starts the session over)
    this.events = new v1.EventService(address, credentials);
    // The other stubs share the first one's channel.
    const shared = { channelOverride: this.events.getChannel() };
    this.recommender = new v1.RecommendService(address, credentials, shared);
    this.catalog = new v1.CatalogService(address, credentials, shared);
  }

  _metadata() {
    const metadata = new grpc.Metadata();
    if (this.token) metadata.set('authorization', `Bearer ${this.token}`);
    return metadata;
  }

  _options(deadlineMs) {
    return { deadline: Date.now() + (deadlineMs ?? this.deadlineMs) };
  }

  _unary(stub, method, request, deadlineMs) {
    return new Promise((resolve, reject) => {
      stub[method](request, this._metadata(), this._options(deadlineMs), (error, response) =>
        (error ? reject(error) : resolve(this._observe(response))));
    });
  }

  /**
   * Take a log seq seen elsewhere (BigInt, decimal string or number), e.g. the durableSeq of a write made by
   * another client or request handler, so this client's next reads see that write. Returns sessionSeq.
   */
  sawSeq(seq, logId = '') {
    if (logId && logId !== this.sessionLog) {
      if (this.sessionLog) this.sessionSeq = 0n; // the server's store was replaced: its seqs are a new clock
      this.sessionLog = logId;
    }
    const value = BigInt(seq || 0);
    if (value > this.sessionSeq) this.sessionSeq = value;
    return this.sessionSeq;
  }

  /**
   * A read's token: min_seq, the caller's when set (non-zero), else the session's ('0', no wait, under
   * 'eventual'), and the log it counts in, so a server of another log refuses it instead of misreading it.
   */
  _token(minSeq) {
    // Strings: protobufjs takes decimal strings for uint64 fields, not BigInts.
    if (minSeq && BigInt(minSeq) > 0n) return { min_seq: String(minSeq), log_id: this.sessionLog };
    if (this.consistency !== 'session') return { min_seq: '0', log_id: '' };
    return { min_seq: String(this.sessionSeq), log_id: this.sessionLog };
  }

  /** Note the seq an answer reports: a write's durable_seq, a read's served_by.applied_seq (each of a batch's). */
  _observe(response) {
    if (response?.durable_seq !== undefined) this.sawSeq(response.durable_seq, response.log_id);
    for (const answer of [response, ...(response?.responses ?? [])]) {
      if (answer?.served_by) this.sawSeq(answer.served_by.applied_seq, answer.served_by.log_id);
    }
    return response;
  }

  /** Resolves once the channel is connected (or rejects after timeoutMs). */
  ready(timeoutMs = 10_000) {
    return new Promise((resolve, reject) => {
      this.events.waitForReady(Date.now() + timeoutMs, (error) => (error ? reject(error) : resolve()));
    });
  }

  /**
   * Send events over the bidirectional StreamEvents stream in batches of `batchSize`.
   * Resolves once every batch is acked with {batches, accepted, duplicates, rejections, durableSeq}
   * (durableSeq is a decimal string: uint64).
   */
  sendEvents(events, { batchSize = 100, deadlineMs } = {}) {
    const list = [...events].map((e) => ({ ...e, event_id: e.event_id || randomUUID(), type: eventType(e.type) }));
    const batches = [];
    for (let i = 0; i < list.length; i += batchSize) {
      batches.push({ batch_id: String(batches.length), events: list.slice(i, i + batchSize) });
    }
    return new Promise((resolve, reject) => {
      const totals = { batches: 0, accepted: 0, duplicates: 0, rejections: [], durableSeq: '0' };
      const call = this.events.StreamEvents(this._metadata(), this._options(deadlineMs));
      call.on('data', (ack) => {
        totals.batches += 1;
        totals.accepted += ack.accepted;
        totals.duplicates += ack.duplicates;
        for (const r of ack.rejections) totals.rejections.push({ batch_id: ack.batch_id, ...r });
        if (BigInt(ack.durable_seq) > BigInt(totals.durableSeq)) totals.durableSeq = ack.durable_seq;
        this.sawSeq(ack.durable_seq, ack.log_id);
      });
      call.on('error', reject);
      call.on('end', () => {
        if (totals.batches !== batches.length) {
          reject(new Error(`stream ended after ${totals.batches} of ${batches.length} acks`));
        } else {
          resolve(totals);
        }
      });
      (async () => {
        for (const batch of batches) {
          if (!call.write(batch)) await new Promise((r) => call.once('drain', r));
        }
        call.end();
      })().catch(reject);
    });
  }

  /**
   * Recommend `k` items for a user. filters: {excludeSeen, excludeItemIds, includeCategories,
   * excludeCategories, requestId}; options: userModel ('ials' | 'sequence'), mmrLambda and maxPerCategory
   * (diversity), explain. Unset k / excludeSeen use the server defaults (10 / true).
   * minSeq (every read takes it) overrides the session's seq for this call. The response's
   * recommendation_id goes back on the events it leads to (makeEvent's recommendationId).
   */
  recommend(userId, k, { excludeSeen, excludeItemIds = [], includeCategories = [], excludeCategories = [],
    requestId = '', userModel = '', mmrLambda = 0, maxPerCategory = 0, explain = false, minSeq, deadlineMs } = {}) {
    const request = {
      request_id: requestId, user_id: userId, exclude_item_ids: excludeItemIds,
      include_categories: includeCategories, exclude_categories: excludeCategories, ...this._token(minSeq),
      user_model: userModel ? `USER_MODEL_${userModel.toUpperCase()}` : 'USER_MODEL_DEFAULT',
      diversity: { mmr_lambda: mmrLambda, max_per_category: maxPerCategory }, explain,
    };
    if (k !== undefined && k !== null) request.k = k;
    if (excludeSeen !== undefined && excludeSeen !== null) request.exclude_seen = excludeSeen;
    return this._unary(this.recommender, 'Recommend', request, deadlineMs);
  }

  getUser(userId, { historyLimit = 0, includeEmbedding = false, minSeq, deadlineMs } = {}) {
    return this._unary(this.catalog, 'GetUser', {
      user_id: userId, history_limit: historyLimit, include_embedding: includeEmbedding, ...this._token(minSeq),
    }, deadlineMs);
  }

  stats({ minSeq, deadlineMs } = {}) {
    return this._unary(this.catalog, 'Stats', this._token(minSeq), deadlineMs);
  }

  close() {
    this.events.close();
  }
}

/** connect('127.0.0.1:50051', {token, tls, deadlineMs, consistency}) -> StreamrecClient */
export function connect(address, options = {}) {
  return new StreamrecClient(address, options);
}
