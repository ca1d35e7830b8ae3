// Pinned frames across reloads: one IndexedDB object store of records {id, at, info, frame, canvas, layers}
// (Blobs stored as they are). Per origin, as the browser keeps IndexedDB: a studio on another port has its own.

const DB_NAME = "lcm-live";
const STORE = "pinned-frames";
const VERSION = 1;

function request(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

export class PinStore {
  constructor(name = DB_NAME) {
    this.name = name;
    this.db = null;
  }

  /** null when the browser has no IndexedDB (or refuses it: a private window may): pins then last one visit. */
  static async open(name = DB_NAME) {
    if (typeof indexedDB === "undefined") return null;
    const store = new PinStore(name);
    const req = indexedDB.open(name, VERSION);
    req.onupgradeneeded = () => {
      if (!req.result.objectStoreNames.contains(STORE)) req.result.createObjectStore(STORE, { keyPath: "id" });
    };
    try {
      store.db = await request(req);
    } catch {
      return null;
    }
    return store;
  }

  /** Run `work(store)` (one request) in a transaction; resolves with its result once the transaction is done. */
  tx(mode, work) {
    return new Promise((resolve, reject) => {
      const tx = this.db.transaction(STORE, mode);
      const req = work(tx.objectStore(STORE));
      tx.oncomplete = () => resolve(req.result);
      tx.onerror = () => reject(tx.error || req.error);
      tx.onabort = () => reject(tx.error || new Error("IndexedDB transaction aborted (storage full?)"));
    });
  }

  all() {
    return this.tx("readonly", (s) => s.getAll());
  }

  put(record) {
    return this.tx("readwrite", (s) => s.put(record));
  }

  delete(id) {
    return this.tx("readwrite", (s) => s.delete(id));
  }
}
